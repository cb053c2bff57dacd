import CPhatgooseKernels
import PhatgooseFormats

/// The packed single-file library (`phatgoose pack`), specified in docs/formats.md:
///
///     bytes 0..<8    magic "PHATPACK"
///     bytes 8..<16   header length H, u64 little-endian
///     bytes 16..<16+H  UTF-8 JSON header, padded with spaces so that 16+H is a multiple of 64
///     then the data: every tensor at a 64-byte aligned offset (relative to the data start), zero padding between
///
/// Weights are stored in their source dtype, `lora_B` already transposed, so a load maps the file and points into
/// it without copying; only the normalised gate matrices are computed at load.
extension ExpertLibrary {
    /// The eight bytes a packed library file starts with: `PHATPACK`.
    public static let packedMagic: [UInt8] = Array("PHATPACK".utf8)
    static let packedAlignment = 64
    static let packedMaximumHeaderLength = 1 << 30

    /// Writes this library as one packed file, atomically.
    public func writePacked(to path: String) throws {
        var offset = 0
        var order: [WeightTensor] = []
        func place(_ tensor: WeightTensor) -> JSONValue {
            let position = offset
            order.append(tensor)
            offset += (tensor.byteCount + Self.packedAlignment - 1) / Self.packedAlignment * Self.packedAlignment
            return .object([
                ("dtype", .string(tensor.dtype.rawValue)),
                ("shape", .array(tensor.shape.map { JSONValue.integer($0) })),
                ("offset", .integer(position)),
            ])
        }
        let modulesJSON: [JSONValue] = modules.map { module in
            .object([
                ("name", .string(module.name)),
                ("in", .integer(module.inWidth)),
                ("out", .integer(module.outWidth)),
                ("experts", .array(module.experts.map { piece in
                    .object([
                        ("expert", .integer(piece.expert.int)),
                        ("lora_A", place(piece.a)),
                        ("lora_B_t", place(piece.bTransposed)),
                        ("gate", place(piece.gate)),
                    ])
                })),
            ])
        }
        let header = JSONValue.object([
            ("format", .string("phatgoose-packed")),
            ("version", .integer(1)),
            ("routing", .object([("router", .string(routing.router.rawValue)), ("top_k", .integer(routing.topK))])),
            ("experts", .array(experts.map { .object([("name", .string($0.name)), ("path", .string($0.path)), ("config", $0.config.document)]) })),
            ("modules", .array(modulesJSON)),
        ])
        var headerBytes = Array(header.serialized().utf8)
        while (16 + headerBytes.count) % Self.packedAlignment != 0 { headerBytes.append(UInt8(ascii: " ")) }
        let file = try AtomicFile(path: path)
        try file.write(Self.packedMagic)
        try file.write(littleEndian: UInt64(headerBytes.count))
        try file.write(headerBytes)
        for tensor in order {
            try file.write(tensor.bytes)
            let padded = (tensor.byteCount + Self.packedAlignment - 1) / Self.packedAlignment * Self.packedAlignment
            if padded > tensor.byteCount { try file.writeZeros(padded - tensor.byteCount) }
        }
        try file.commit()
    }

    /// True when the file at `path` starts with the packed magic.
    public static func isPacked(_ storage: MappedFile) -> Bool {
        storage.bytes.count >= 8 && Array(storage.bytes[0..<8]) == packedMagic
    }

    /// Loads a packed library by mapping it.
    public static func loadPacked(_ path: String) throws -> ExpertLibrary {
        let storage = try MappedFile(path: path)
        return try loadPacked(storage)
    }

    /// Loads a packed library from bytes already in memory (a mapping or a copy).
    public static func loadPacked(_ storage: MappedFile) throws -> ExpertLibrary {
        let path = storage.path
        let bytes = storage.bytes
        func failure(_ subject: String?, _ message: String) -> FormatError {
            FormatError(.packed, file: path, subject: subject, message)
        }
        guard isPacked(storage) else {
            let found = bytes.count < 8 ? "a file of \(bytes.count) bytes" : "other bytes"
            throw failure("magic", "expected a library directory or a packed library starting with \"PHATPACK\", found \(found)")
        }
        guard bytes.count >= 16 else { throw failure("header length", "expected 16 bytes of preamble, found \(bytes.count)") }
        let declared = bytes.loadUnaligned(fromByteOffset: 8, as: UInt64.self).littleEndian
        guard declared <= UInt64(packedMaximumHeaderLength), 16 + Int(declared) <= bytes.count else {
            throw failure("header length", "expected at most \(min(packedMaximumHeaderLength, bytes.count - 16)) bytes, found \(declared)")
        }
        let headerLength = Int(declared)
        guard (16 + headerLength) % packedAlignment == 0 else {
            throw failure("header length", "expected the data to start at a multiple of \(packedAlignment) bytes, found it at \(16 + headerLength)")
        }
        let root: JSONValue
        do {
            root = try JSONParser.parse(UnsafeRawBufferPointer(rebasing: bytes[16..<(16 + headerLength)]))
        } catch {
            throw failure("header", "expected a JSON object, found invalid JSON (\(error))")
        }
        guard case .string("phatgoose-packed")? = root["format"] else {
            throw failure("field \"format\"", "expected \"phatgoose-packed\", found \(root["format"]?.kindDescription ?? "nothing")")
        }
        guard case let .number(version)? = root["version"], version.int64 == 1 else {
            throw failure("field \"version\"", "expected 1, found \(root["version"]?.kindDescription ?? "nothing")")
        }
        // The manifest rules apply to the packed expert list and routing too.
        let manifestDocument = JSONValue.object([
            ("format", .string("phatgoose-library")), ("version", .integer(1)),
            ("experts", root["experts"] ?? .null), ("routing", root["routing"] ?? .null),
        ])
        let manifest = try LibraryManifest(document: manifestDocument, file: path)
        guard case let .array(expertItems)? = root["experts"] else { preconditionFailure("validated by the manifest rules") }
        var experts: [ExpertInfo] = []
        for (i, item) in expertItems.enumerated() {
            guard let document = item["config"] else { throw failure("field \"experts[\(i)].config\"", "expected the adapter config object, found nothing") }
            let config = try AdapterConfig(document: document, file: "\(path) (expert \"\(manifest.experts[i].name)\")")
            experts.append(ExpertInfo(name: manifest.experts[i].name, path: manifest.experts[i].path, config: config))
        }
        guard case let .array(moduleItems)? = root["modules"] else {
            throw failure("field \"modules\"", "expected a list, found \(root["modules"]?.kindDescription ?? "nothing")")
        }
        let dataStart = 16 + headerLength
        let dataLength = bytes.count - dataStart
        var ranges: [(Range<Int>, String)] = []
        var modules: [RoutedModule] = []
        var seen = Set<String>()
        for (m, item) in moduleItems.enumerated() {
            let field = "modules[\(m)]"
            guard case let .string(name)? = item["name"], !name.isEmpty else { throw failure("field \"\(field).name\"", "expected a non-empty string, found \(item["name"]?.kindDescription ?? "nothing")") }
            guard seen.insert(name).inserted else { throw failure("module \(name)", "expected unique module names, found this one twice") }
            guard case let .number(inNumber)? = item["in"], let inWidth = inNumber.int64, inWidth > 0, inWidth <= Int32.max,
                  case let .number(outNumber)? = item["out"], let outWidth = outNumber.int64, outWidth > 0, outWidth <= Int32.max
            else { throw failure("module \(name)", "expected positive integer \"in\" and \"out\" widths, found \(item["in"]?.kindDescription ?? "nothing") and \(item["out"]?.kindDescription ?? "nothing")") }
            guard case let .array(pieceItems)? = item["experts"], !pieceItems.isEmpty else {
                throw failure("module \(name)", "expected a non-empty \"experts\" list, found \(item["experts"]?.kindDescription ?? "nothing")")
            }
            var pieces: [ModuleExpert] = []
            for pieceItem in pieceItems {
                guard case let .number(number)? = pieceItem["expert"], let e = number.int64, e >= 0, e < experts.count else {
                    throw failure("module \(name)", "expected expert indices below \(experts.count), found \(pieceItem["expert"]?.kindDescription ?? "nothing")")
                }
                guard pieces.last.map({ $0.expert.int < Int(e) }) ?? true else {
                    throw failure("module \(name)", "expected expert indices in ascending order without repeats, found \(e) after \(pieces.last!.expert)")
                }
                let expert = experts[Int(e)]
                let who = "module \(name), expert \"\(expert.name)\""
                guard expert.config.targets(name) else {
                    throw failure(who, "expected target_modules of the expert to select the module, found it does not")
                }
                let rank = expert.config.rank(for: name)
                func tensor(_ key: String, shape: [Int]) throws -> WeightTensor {
                    guard let ref = pieceItem[key] else { throw failure("\(who), \(key)", "expected a tensor reference, found nothing") }
                    guard case let .string(dtypeName)? = ref["dtype"], let dtype = DType(rawValue: dtypeName), dtype.isComputeFloat else {
                        throw failure("\(who), \(key)", "expected dtype F32, F16 or BF16, found \(ref["dtype"]?.kindDescription ?? "nothing")")
                    }
                    guard case let .array(dims)? = ref["shape"], dims == shape.map({ JSONValue.integer($0) }) else {
                        throw failure("\(who), \(key)", "expected shape \(shape), found \(ref["shape"]?.serialized() ?? "nothing")")
                    }
                    guard case let .number(offsetNumber)? = ref["offset"], let offset = offsetNumber.int64, offset >= 0, offset % Int64(packedAlignment) == 0 else {
                        throw failure("\(who), \(key)", "expected an offset that is a non-negative multiple of \(packedAlignment), found \(ref["offset"]?.kindDescription ?? "nothing")")
                    }
                    let size = shape.reduce(1, *) * dtype.size
                    guard Int(offset) <= dataLength, size <= dataLength - Int(offset) else {
                        throw failure("\(who), \(key)", "expected \(size) bytes at data offset \(offset), found the data ends at \(dataLength)")
                    }
                    ranges.append((Int(offset)..<(Int(offset) + size), "\(who), \(key)"))
                    return WeightTensor(dtype: dtype, shape: shape, owner: storage, pointer: bytes.baseAddress! + dataStart + Int(offset))
                }
                let piece = ModuleExpert(
                    expert: ExpertIndex(Int(e)), rank: rank, alpha: expert.config.alpha(for: name),
                    scale: Float(expert.config.scale(for: name)),
                    a: try tensor("lora_A", shape: [rank, Int(inWidth)]),
                    bTransposed: try tensor("lora_B_t", shape: [rank, Int(outWidth)]),
                    gate: try tensor("gate", shape: [Int(inWidth)]))
                let bad = Int(pg_count_nonfinite(piece.gate.pointer, piece.gate.kernelDType, piece.gate.elementCount))
                guard bad == 0 else { throw failure("\(who), gate", "expected finite values, found \(bad) NaN or infinite") }
                pieces.append(piece)
            }
            modules.append(RoutedModule(name: name, inWidth: Int(inWidth), outWidth: Int(outWidth), experts: pieces,
                                        gateMatrix: GateMatrixBuilder.build(pieces.map(\.gate), inWidth: Int(inWidth))))
        }
        ranges.sort { $0.0.lowerBound < $1.0.lowerBound }
        for (previous, next) in zip(ranges, ranges.dropFirst()) where next.0.lowerBound < previous.0.upperBound {
            throw failure(next.1, "expected tensors not to overlap, found this one overlapping \(previous.1)")
        }
        return ExpertLibrary(source: .packed(path), experts: experts, modules: modules, routing: manifest.routing)
    }
}
