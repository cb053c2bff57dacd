import CPhatgooseKernels

/// Builds a safetensors file: tensors are laid out contiguously in the order added, the header is padded with spaces
/// to a multiple of 8 bytes (as the reference writer does), and the file is written atomically.
public struct SafetensorsWriter {
    private var entries: [(name: String, dtype: DType, shape: [Int], data: [UInt8])] = []
    private var names = Set<String>()
    /// Optional `__metadata__`.
    public var metadata: [String: String]? = nil

    /// Creates a writer with no tensors.
    public init() {}

    /// Adds a tensor from raw little-endian bytes. The byte count must match the shape.
    public mutating func add(_ name: String, dtype: DType, shape: [Int], bytes: [UInt8]) {
        precondition(shape.reduce(1, *) * dtype.size == bytes.count, "tensor '\(name)': shape \(shape) of \(dtype.rawValue) needs \(shape.reduce(1, *) * dtype.size) bytes, got \(bytes.count)")
        precondition(names.insert(name).inserted, "duplicate tensor name '\(name)'")
        entries.append((name, dtype, shape, bytes))
    }

    /// Adds F32 values stored as `dtype` (F32, F16 or BF16; rounded to nearest even).
    public mutating func add(_ name: String, floats: [Float], shape: [Int], as dtype: DType = .f32) {
        add(name, dtype: dtype, shape: shape, bytes: Self.encode(floats, as: dtype))
    }

    /// Adds I32 values.
    public mutating func add(_ name: String, int32s: [Int32], shape: [Int]) {
        var bytes = [UInt8]()
        bytes.reserveCapacity(int32s.count * 4)
        for value in int32s { withUnsafeBytes(of: value.littleEndian) { bytes.append(contentsOf: $0) } }
        add(name, dtype: .i32, shape: shape, bytes: bytes)
    }

    /// Encodes F32 values as `dtype` bytes (F32, F16 or BF16).
    public static func encode(_ floats: [Float], as dtype: DType) -> [UInt8] {
        guard let code = dtype.kernelCode else { preconditionFailure("cannot encode floats as \(dtype.rawValue)") }
        return [UInt8](unsafeUninitializedCapacity: floats.count * dtype.size) { buffer, initialized in
            floats.withUnsafeBufferPointer { source in
                if !floats.isEmpty { pg_convert_from_f32(source.baseAddress, code, buffer.baseAddress, floats.count) }
            }
            initialized = floats.count * dtype.size
        }
    }

    /// The header JSON (unpadded) for the tensors added so far.
    public func headerJSON() -> String {
        var members: [(key: String, value: JSONValue)] = []
        if let metadata {
            members.append(("__metadata__", .object(metadata.sorted { $0.key < $1.key }.map { ($0.key, JSONValue.string($0.value)) })))
        }
        var offset = 0
        for entry in entries {
            let end = offset + entry.data.count
            members.append((entry.name, .object([
                ("dtype", .string(entry.dtype.rawValue)),
                ("shape", .array(entry.shape.map { JSONValue.integer($0) })),
                ("data_offsets", .array([.integer(offset), .integer(end)])),
            ])))
            offset = end
        }
        return JSONValue.object(members).serialized()
    }

    /// Writes the file atomically to `path`.
    public func write(to path: String) throws(FormatError) {
        var header = Array(headerJSON().utf8)
        while header.count % 8 != 0 { header.append(UInt8(ascii: " ")) }
        let file = try AtomicFile(path: path)
        try file.write(littleEndian: UInt64(header.count))
        try file.write(header)
        for entry in entries { try file.write(entry.data) }
        try file.commit()
    }
}
