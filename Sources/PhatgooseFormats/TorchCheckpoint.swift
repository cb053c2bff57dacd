/// A PyTorch checkpoint holding a tensor state dict, as `torch.save(state_dict, path)` writes it: a zip archive of
/// `<prefix>/data.pkl` (the pickled dict) and one stored entry per storage, `<prefix>/data/<key>`, read in place
/// from a mapping.
///
/// The pickle is untrusted and read by a restricted machine (``TorchPickleReader``): it names only
/// `collections.OrderedDict`, the tensor rebuild functions and storage types; every other global is refused before
/// anything could run. Tensors are views (offset, shape, strides) that ``copyElements(of:transposed:into:)``
/// gathers on demand, so a checkpoint of many gigabytes is never held in memory.
///
/// # Thread safety
/// Immutable after `init`; the mapping is read-only. Safe to share across threads.
public struct TorchCheckpoint: Sendable {
    /// The checkpoint's path.
    public var path: String { archive.path }
    /// The zip archive.
    public let archive: ZipArchive
    /// The archive's top folder, for example `best` (entries are `best/data.pkl`, `best/data/0`, ...).
    public let prefix: String
    /// The state dict's tensors in the pickle's order.
    public let tensors: [(name: String, tensor: TorchTensor)]
    /// Keys of the state dict whose values are not tensors (kept only to be reported).
    public let otherKeys: [String]

    /// Opens `path`, reads its pickle and checks every storage the tensors need.
    public init(path: String) throws(FormatError) {
        try self.init(storage: MappedFile(path: path))
    }

    /// Reads the checkpoint in `storage` (a mapping, or bytes from elsewhere under a name).
    public init(storage: MappedFile) throws(FormatError) {
        let path = storage.path
        let bytes = storage.bytes
        func failure(_ subject: String?, _ message: String) -> FormatError {
            FormatError(.checkpoint, file: path, subject: subject, message)
        }
        guard ZipArchive.hasZipSignature(bytes) else {
            if bytes.count >= 2 && bytes[0] == 0x80 && bytes[1] <= 5 {
                throw failure(nil, "expected a torch.save zip archive, found a legacy (non-zip) pickle checkpoint; re-save it with a PyTorch of version 1.6 or later (torch.save writes the zip format by default), which reading here requires")
            }
            throw failure(nil, "expected a torch.save zip archive (starting with 'PK'), found \(bytes.isEmpty ? "an empty file" : "other bytes")")
        }
        let archive = try ZipArchive(storage: storage)
        let pickles = archive.entries.filter { entry in
            let parts = entry.name.split(separator: "/", omittingEmptySubsequences: false)
            return parts.count == 2 && parts[1] == "data.pkl" && !parts[0].isEmpty
        }
        guard pickles.count == 1 else {
            throw failure(nil, "expected exactly one '<prefix>/data.pkl' entry as torch.save writes, found \(pickles.count)")
        }
        let prefix = String(pickles[0].name.dropLast("/data.pkl".count))
        if let order = archive.entry(named: prefix + "/byteorder") {
            let text = String(decoding: try archive.data(of: order), as: UTF8.self)
            guard text == "little" else { throw failure("entry '\(order.name)'", "expected little-endian storages, found '\(text)'") }
        }
        var reader = TorchPickleReader(bytes: try archive.data(of: pickles[0]), file: path, entry: pickles[0].name,
                                       maxStorageElements: bytes.count)
        let root = try reader.read()
        defer { reader.dismantle(also: [root]) }
        guard case let .dict(dict) = root else {
            throw failure(pickles[0].name, "expected a state dict (a dict of tensors), found \(root.kindDescription)")
        }
        var tensors: [(name: String, tensor: TorchTensor)] = []
        var others: [String] = []
        var seen = Set<String>()
        var storages: [String: TorchStorage] = [:]
        for (key, value) in dict.items {
            guard case let .string(name) = key else {
                throw failure(pickles[0].name, "expected string keys in the state dict, found \(key.kindDescription)")
            }
            guard seen.insert(name).inserted else { throw failure("key '\(name)'", "expected unique keys in the state dict, found this one twice") }
            guard case let .tensor(tensor) = value else {
                others.append(name)
                continue
            }
            if let known = storages[tensor.storage.key], known != tensor.storage {
                throw failure("key '\(name)'", "expected storage '\(tensor.storage.key)' to have one type and size, found \(known.dtype.rawValue) x \(known.count) and \(tensor.storage.dtype.rawValue) x \(tensor.storage.count)")
            }
            storages[tensor.storage.key] = tensor.storage
            tensors.append((name, tensor))
        }
        // Every storage must be an entry of exactly its size; bytes are checked (CRC) when read.
        for (_, storage) in storages.sorted(by: { $0.key < $1.key }) {
            let name = "\(prefix)/data/\(storage.key)"
            guard let entry = archive.entry(named: name) else {
                throw failure("entry '\(name)'", "expected the storage of \(storage.count) \(storage.dtype.rawValue) elements, found no such entry (truncated?)")
            }
            let (size, overflow) = storage.count.multipliedReportingOverflow(by: storage.dtype.size)
            guard !overflow, entry.compressedSize == size else {
                throw failure("entry '\(name)'", "expected \(storage.count * storage.dtype.size) bytes (\(storage.count) \(storage.dtype.rawValue) elements), found \(entry.compressedSize)")
            }
        }
        self.archive = archive
        self.prefix = prefix
        self.tensors = tensors
        self.otherKeys = others
    }

    /// The tensor named `name`, if any.
    public func tensor(named name: String) -> TorchTensor? { tensors.first { $0.name == name }?.tensor }

    /// The checked bytes of a storage (its CRC-32 is verified on every call: call once per storage and keep them).
    public func bytes(of storage: TorchStorage) throws(FormatError) -> UnsafeRawBufferPointer {
        let name = "\(prefix)/data/\(storage.key)"
        guard let entry = archive.entry(named: name) else {
            throw FormatError(.checkpoint, file: path, subject: "entry '\(name)'", "expected a storage entry, found none")
        }
        return try archive.data(of: entry)
    }

    /// Appends the elements of a 1-D or 2-D `tensor` to `output`, row-major, in the tensor's own dtype, reading from
    /// `storageBytes` (``bytes(of:)`` of its storage). `transposed` writes a 2-D tensor's transpose.
    public static func copyElements(of tensor: TorchTensor, from storageBytes: UnsafeRawBufferPointer, transposed: Bool = false,
                                    into output: inout [UInt8]) {
        precondition(tensor.shape.count == 1 || tensor.shape.count == 2, "copyElements: expected a 1-D or 2-D tensor")
        let size = tensor.dtype.size
        let rows = tensor.shape.count == 2 ? tensor.shape[transposed ? 1 : 0] : 1
        let columns = tensor.shape.count == 2 ? tensor.shape[transposed ? 0 : 1] : tensor.shape[0]
        let rowStride = tensor.shape.count == 2 ? tensor.strides[transposed ? 1 : 0] : 0
        let columnStride = tensor.shape.count == 2 ? tensor.strides[transposed ? 0 : 1] : tensor.strides[0]
        let start = output.count
        output.reserveCapacity(start + rows * columns * size)
        guard rows * columns > 0 else { return }
        precondition((tensor.storageOffset + (rows - 1) * rowStride + (columns - 1) * columnStride + 1) * size <= storageBytes.count)
        let base = storageBytes.baseAddress!
        output.append(contentsOf: repeatElement(0, count: rows * columns * size))
        output.withUnsafeMutableBytes { destination in
            var at = start
            for r in 0..<rows {
                let rowStart = tensor.storageOffset + r * rowStride
                if columnStride == 1 {
                    (destination.baseAddress! + at).copyMemory(from: base + rowStart * size, byteCount: columns * size)
                    at += columns * size
                } else {
                    // Strided gather (a transpose): one element at a time, typed so each is a single load and store.
                    let out = destination.baseAddress! + at
                    switch size {
                    case 2: gather(UInt16.self, base, rowStart, columnStride, columns, out)
                    case 4: gather(UInt32.self, base, rowStart, columnStride, columns, out)
                    case 8: gather(UInt64.self, base, rowStart, columnStride, columns, out)
                    default: gather(UInt8.self, base, rowStart, columnStride, columns, out)
                    }
                    at += columns * size
                }
            }
        }
    }

    private static func gather<Element>(_: Element.Type, _ base: UnsafeRawPointer, _ first: Int, _ stride: Int, _ count: Int,
                                        _ out: UnsafeMutableRawPointer) {
        for c in 0..<count {
            let value = base.loadUnaligned(fromByteOffset: (first + c * stride) * MemoryLayout<Element>.size, as: Element.self)
            out.storeBytes(of: value, toByteOffset: c * MemoryLayout<Element>.size, as: Element.self)
        }
    }
}
