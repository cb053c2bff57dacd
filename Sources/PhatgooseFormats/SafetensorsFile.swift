import CPhatgooseKernels

/// One tensor's entry in a safetensors header.
public struct TensorInfo: Sendable, Equatable {
    /// The tensor's name in the header.
    public let name: String
    /// The element type.
    public let dtype: DType
    /// Dimensions, outermost first; empty for a rank-0 tensor.
    public let shape: [Int]
    /// Byte range inside the data buffer (which starts right after the header).
    public let dataOffsets: Range<Int>

    /// Number of elements (1 for a rank-0 tensor).
    public var elementCount: Int { shape.reduce(1, *) }
    /// The shape as text, `[2, 3]`.
    public var shapeDescription: String { "[" + shape.map(String.init).joined(separator: ", ") + "]" }
}

/// A validated, memory-mapped safetensors file. Tensor data is read in place, without copying.
///
/// Validation is at least as strict as the reference implementation (huggingface/safetensors): the header length,
/// UTF-8, a JSON object, known dtypes, non-negative integer dims, exactly two integer offsets, no size overflow,
/// sizes matching shapes, and tensors covering the data buffer exactly, with no gap, overlap or trailing bytes.
/// Duplicate tensor names are refused too.
public struct SafetensorsFile: Sendable {
    /// Largest header accepted, as in the reference implementation.
    public static let maximumHeaderLength = 100_000_000

    /// The file's path.
    public var path: String { storage.path }
    /// The mapping that every tensor view points into.
    public let storage: MappedFile
    /// Tensors in ascending order of their data offsets.
    public let tensors: [TensorInfo]
    /// The `__metadata__` map, if present and not null.
    public let metadata: [String: String]?
    /// Absolute byte offset of the data buffer in the file.
    public let dataStart: Int
    private let index: [String: Int]

    /// Opens and validates `path`.
    public init(path: String) throws(FormatError) {
        try self.init(storage: MappedFile(path: path))
    }

    /// Validates an existing mapping.
    public init(storage: MappedFile) throws(FormatError) {
        self.storage = storage
        let bytes = storage.bytes
        let path = storage.path
        func failure(_ subject: String?, _ message: String) -> FormatError {
            FormatError(.safetensors, file: path, subject: subject, message)
        }
        guard bytes.count >= 8 else {
            throw failure("header length", "expected an 8-byte little-endian header length, found a file of \(bytes.count) bytes")
        }
        let declared = bytes.loadUnaligned(as: UInt64.self).littleEndian
        guard declared <= UInt64(Self.maximumHeaderLength) else {
            // Random bytes land here: say what the file is not before the number that proves it.
            throw failure("header length", "not a safetensors file: expected a header length of at most \(Self.maximumHeaderLength) bytes, found \(declared)")
        }
        let headerLength = Int(declared)
        guard 8 + headerLength <= bytes.count else {
            throw failure("header length", "not a safetensors file, or a truncated one: the header of \(headerLength) bytes runs past the end of the file (\(bytes.count) bytes)")
        }
        let headerBytes = UnsafeRawBufferPointer(rebasing: bytes[8..<(8 + headerLength)])
        guard String(validating: headerBytes, as: UTF8.self) != nil else {
            throw failure("header", "not a safetensors file: expected UTF-8 JSON, found bytes that are not valid UTF-8")
        }
        guard headerLength > 0, headerBytes[0] == UInt8(ascii: "{") else {
            throw failure("header", "not a safetensors file: expected a JSON object starting with '{', found \(headerLength == 0 ? "an empty header" : "'\(Character(Unicode.Scalar(headerBytes[0])))'")")
        }
        let root: JSONValue
        do {
            root = try JSONParser.parse(headerBytes)
        } catch {
            throw failure("header", "expected a JSON object, found invalid JSON (\(error))")
        }
        guard case let .object(members) = root else {
            throw failure("header", "expected a JSON object, found \(root.kindDescription)")
        }
        var metadata: [String: String]? = nil
        var tensors: [TensorInfo] = []
        tensors.reserveCapacity(members.count)
        for (name, value) in members {
            if name == "__metadata__" {
                metadata = try Self.parseMetadata(value, path: path)
            } else {
                tensors.append(try Self.parseTensorInfo(name: name, value, path: path))
            }
        }
        tensors.sort { ($0.dataOffsets.lowerBound, $0.dataOffsets.upperBound) < ($1.dataOffsets.lowerBound, $1.dataOffsets.upperBound) }
        let dataStart = 8 + headerLength
        let dataLength = bytes.count - dataStart
        var expected = 0
        var previous: String? = nil
        for info in tensors {
            let begin = info.dataOffsets.lowerBound
            if begin != expected {
                let after = previous.map { "the end of tensor '\($0)'" } ?? "the start of the data buffer"
                let kind = begin > expected ? "a gap" : "an overlap"
                throw failure("tensor '\(info.name)'", "expected data to start at byte \(expected) (\(after)), found \(begin): \(kind)")
            }
            if info.dataOffsets.upperBound > dataLength {
                throw failure("tensor '\(info.name)'", "data_offsets end at byte \(info.dataOffsets.upperBound), past the end of the data buffer (\(dataLength) bytes)")
            }
            expected = info.dataOffsets.upperBound
            previous = info.name
        }
        if expected != dataLength {
            throw failure(previous.map { "tensor '\($0)'" }, "expected the tensors to cover the \(dataLength)-byte data buffer exactly, found \(dataLength - expected) bytes after the last tensor")
        }
        var index: [String: Int] = [:]
        for (i, info) in tensors.enumerated() { index[info.name] = i }
        self.tensors = tensors
        self.metadata = metadata
        self.dataStart = dataStart
        self.index = index
    }

    private static func parseMetadata(_ value: JSONValue, path: String) throws(FormatError) -> [String: String]? {
        switch value {
        case .null:
            return nil
        case let .object(members):
            var map: [String: String] = [:]
            for (key, entry) in members {
                guard case let .string(text) = entry else {
                    throw FormatError(.safetensors, file: path, subject: "__metadata__ \"\(key)\"", "expected a string, found \(entry.kindDescription)")
                }
                map[key] = text
            }
            return map
        default:
            throw FormatError(.safetensors, file: path, subject: "__metadata__", "expected a map of strings to strings, found \(value.kindDescription)")
        }
    }

    private static func parseTensorInfo(name: String, _ value: JSONValue, path: String) throws(FormatError) -> TensorInfo {
        let subject = "tensor '\(name)'"
        func failure(_ message: String) -> FormatError { FormatError(.safetensors, file: path, subject: subject, message) }
        guard case .object = value else { throw failure("expected an object with dtype, shape and data_offsets, found \(value.kindDescription)") }
        guard let dtypeValue = value["dtype"] else { throw failure("expected a \"dtype\" field, found none") }
        guard case let .string(dtypeName) = dtypeValue else { throw failure("expected \"dtype\" to be a string, found \(dtypeValue.kindDescription)") }
        guard let dtype = DType(rawValue: dtypeName) else {
            throw failure("expected a known dtype (\(DType.allCases.map(\.rawValue).joined(separator: ", "))), found \"\(dtypeName)\"")
        }
        guard let shapeValue = value["shape"] else { throw failure("expected a \"shape\" field, found none") }
        guard case let .array(dims) = shapeValue else { throw failure("expected \"shape\" to be an array, found \(shapeValue.kindDescription)") }
        var shape: [Int] = []
        var elements = 1
        var overflow = false
        for (axis, dim) in dims.enumerated() {
            guard case let .number(number) = dim, let n = number.uint64, n <= UInt64(Int.max) else {
                throw failure("expected dim \(axis) of \"shape\" to be a non-negative integer, found \(dim.kindDescription)")
            }
            shape.append(Int(n))
            let (product, over) = elements.multipliedReportingOverflow(by: Int(n))
            elements = product
            overflow = overflow || over
        }
        guard let offsetsValue = value["data_offsets"] else { throw failure("expected a \"data_offsets\" field, found none") }
        guard case let .array(offsets) = offsetsValue, offsets.count == 2 else {
            throw failure("expected \"data_offsets\" to be exactly two integers, found \(offsetsValue.kindDescription)\(offsetsValue.arrayCount.map { " of \($0) elements" } ?? "")")
        }
        var bounds: [Int] = []
        for offset in offsets {
            guard case let .number(number) = offset, let n = number.uint64, n <= UInt64(Int.max) else {
                throw failure("expected \"data_offsets\" to be non-negative integers, found \(offset.kindDescription)")
            }
            bounds.append(Int(n))
        }
        let (bytes, over) = elements.multipliedReportingOverflow(by: dtype.size)
        if overflow || over {
            throw failure("shape \(shape) of \(dtype.rawValue) overflows the size of a buffer")
        }
        guard bounds[1] >= bounds[0] else {
            throw failure("expected data_offsets [begin, end] with end >= begin, found [\(bounds[0]), \(bounds[1])]")
        }
        guard bounds[1] - bounds[0] == bytes else {
            throw failure("shape \(shape) of \(dtype.rawValue) needs \(bytes) bytes, found data_offsets spanning \(bounds[1] - bounds[0])")
        }
        return TensorInfo(name: name, dtype: dtype, shape: shape, dataOffsets: bounds[0]..<bounds[1])
    }

    /// The tensor named `name`, or nil.
    public func tensor(named name: String) -> TensorView? {
        guard let i = index[name] else { return nil }
        return view(tensors[i])
    }

    /// A view of the data of `info`, which must be one of ``tensors``.
    public func view(_ info: TensorInfo) -> TensorView {
        TensorView(info: info, storage: storage, byteOffset: dataStart + info.dataOffsets.lowerBound, path: path)
    }
}

extension JSONValue {
    fileprivate var arrayCount: Int? {
        if case let .array(elements) = self { return elements.count }
        return nil
    }
}

/// A tensor's bytes in place inside a mapping (or another buffer it keeps alive).
public struct TensorView: Sendable {
    /// The tensor's header entry: name, dtype, shape and data offsets.
    public let info: TensorInfo
    /// Keeps the bytes alive.
    public let storage: MappedFile
    /// Absolute offset of the first byte in `storage`.
    public let byteOffset: Int
    /// File the tensor came from, for messages.
    public let path: String

    /// The raw bytes. Valid while `storage` lives (this view keeps it alive).
    public var bytes: UnsafeRawBufferPointer {
        UnsafeRawBufferPointer(rebasing: storage.bytes[byteOffset..<(byteOffset + info.dataOffsets.count)])
    }

    /// The values converted to F32. Throws unless the dtype is F32, F16 or BF16.
    public func floats() throws(FormatError) -> [Float] {
        guard let code = info.dtype.kernelCode else {
            throw FormatError(.values, file: path, subject: "tensor '\(info.name)'", "expected dtype F32, F16 or BF16, found \(info.dtype.rawValue)")
        }
        let count = info.elementCount
        let source = bytes
        return [Float](unsafeUninitializedCapacity: count) { buffer, initialized in
            if count > 0 { pg_convert_to_f32(source.baseAddress, code, buffer.baseAddress, count) }
            initialized = count
        }
    }

    /// The values of an I32 tensor.
    public func int32s() throws(FormatError) -> [Int32] {
        guard info.dtype == .i32 else {
            throw FormatError(.values, file: path, subject: "tensor '\(info.name)'", "expected dtype I32, found \(info.dtype.rawValue)")
        }
        let source = bytes
        return (0..<info.elementCount).map { Int32(littleEndian: source.loadUnaligned(fromByteOffset: $0 * 4, as: Int32.self)) }
    }

    /// Number of NaN or infinite values (0 for non-float dtypes).
    public func nonFiniteCount() -> Int {
        guard let code = info.dtype.kernelCode, info.elementCount > 0 else { return 0 }
        return pg_count_nonfinite(bytes.baseAddress, code, info.elementCount)
    }
}
