import PhatgooseLibrary

/// The messages between rank 0 (the host, which routes) and the expert-serving ranks. Every message starts with a
/// 32-bit kind; values are in the ranks' native byte order (the hello's magic word catches a world that mixes byte
/// orders). Commands go on tag 17 (rank 0 to a rank), answers on tag 18.
enum Wire {
    static let commandTag: Int32 = 17
    static let answerTag: Int32 = 18
    static let magic: UInt32 = 0x5047_4D31  // "PGM1"
    static let version: Int32 = 1

    enum Kind: Int32 {
        /// Rank 0 to all: library fingerprint, memory cap, placement. Answered by `ready`.
        case hello = 1
        /// A rank to rank 0: its share is loaded (status 0) or why not.
        case ready = 2
        /// Rank 0 to a rank: assignments and rows of one module call. Answered by `rows`.
        case call = 3
        /// A rank to rank 0: the expanded rows of a call's assignments, in the order sent.
        case rows = 4
        /// Rank 0 to all: stop serving.
        case stop = 5
    }

    /// Bytes of the call header: kind, module, assignments, unique tokens (Int32 each), call id (Int64).
    static let callHeader = 24
    /// Bytes of the rows header: kind, status, assignments, padding (Int32 each), call id (Int64).
    static let rowsHeader = 24
}

/// A growable, 64-byte aligned byte buffer for building and reading messages; reused so calls allocate nothing once
/// warm.
///
/// # Thread safety
/// Not thread-safe: owned by one runtime or server, used under its lock.
final class MessageBuffer {
    private(set) var pointer: UnsafeMutableRawPointer
    private(set) var capacity: Int
    var count = 0

    init(capacity: Int = 4096) {
        self.capacity = max(capacity, 64)
        pointer = UnsafeMutableRawPointer.allocate(byteCount: self.capacity, alignment: 64)
    }

    deinit { pointer.deallocate() }

    /// Makes room for `bytes` bytes in all, keeping the first `count`.
    func reserve(_ bytes: Int) {
        guard bytes > capacity else { return }
        let grown = max(bytes, capacity * 2)
        let fresh = UnsafeMutableRawPointer.allocate(byteCount: grown, alignment: 64)
        fresh.copyMemory(from: pointer, byteCount: count)
        pointer.deallocate()
        pointer = fresh
        capacity = grown
    }

    func reset() { count = 0 }

    func append<T: BitwiseCopyable>(_ value: T) {
        reserve(count + MemoryLayout<T>.size)
        pointer.storeBytes(of: value, toByteOffset: count, as: T.self)
        count += MemoryLayout<T>.size
    }

    func append(_ bytes: UnsafeRawPointer, count n: Int) {
        reserve(count + n)
        if n > 0 { (pointer + count).copyMemory(from: bytes, byteCount: n) }
        count += n
    }

    func append(_ text: String) {
        var text = text
        text.withUTF8 { bytes in
            if let base = bytes.baseAddress { append(UnsafeRawPointer(base), count: bytes.count) }
        }
    }

    /// Room for `n` more bytes at the end, counted as written.
    func extend(_ n: Int) -> UnsafeMutableRawPointer {
        reserve(count + n)
        defer { count += n }
        return pointer + count
    }
}

/// Reads a received message, checking every read against its size.
struct MessageReader {
    let base: UnsafeRawPointer
    let count: Int
    var offset = 0
    /// Names the message in errors.
    let what: String

    init(_ base: UnsafeRawPointer, count: Int, what: String) {
        self.base = base
        self.count = count
        self.what = what
    }

    mutating func read<T: BitwiseCopyable>(_: T.Type) throws(DistributedError) -> T {
        guard offset + MemoryLayout<T>.size <= count else {
            throw DistributedError(.shape, "\(what): expected at least \(offset + MemoryLayout<T>.size) bytes, found \(count)")
        }
        defer { offset += MemoryLayout<T>.size }
        return base.loadUnaligned(fromByteOffset: offset, as: T.self)
    }

    /// The next `n` bytes, in place.
    mutating func bytes(_ n: Int) throws(DistributedError) -> UnsafeRawPointer {
        guard n >= 0, offset + n <= count else {
            throw DistributedError(.shape, "\(what): expected at least \(offset + max(n, 0)) bytes, found \(count)")
        }
        defer { offset += n }
        return base + offset
    }

    var rest: String {
        String(decoding: UnsafeRawBufferPointer(start: base + offset, count: count - offset), as: UTF8.self)
    }
}

extension ExpertLibrary {
    /// A 64-bit FNV-1a hash of what the ranks must agree on: module names and widths, expert names, and each
    /// piece's rank, scale bits, dtypes and shapes (not the weights' values, which would mean reading them all).
    var shardFingerprint: UInt64 {
        var hash: UInt64 = 0xcbf2_9ce4_8422_2325
        func mix(_ value: UInt64) {
            for shift in stride(from: 0, to: 64, by: 8) {
                hash ^= (value >> UInt64(shift)) & 0xff
                hash &*= 0x0000_0100_0000_01b3
            }
        }
        func mix(_ text: String) {
            for byte in text.utf8 {
                hash ^= UInt64(byte)
                hash &*= 0x0000_0100_0000_01b3
            }
            mix(UInt64(text.utf8.count))
        }
        mix(UInt64(experts.count))
        for expert in experts { mix(expert.name) }
        mix(UInt64(modules.count))
        for module in modules {
            mix(module.name)
            mix(UInt64(module.inWidth))
            mix(UInt64(module.outWidth))
            for piece in module.experts {
                mix(UInt64(bitPattern: Int64(piece.expert.rawValue)))
                mix(UInt64(piece.rank))
                mix(UInt64(piece.scale.bitPattern))
                mix(piece.a.dtype.rawValue)
                mix(piece.bTransposed.dtype.rawValue)
                for d in piece.a.shape + piece.bTransposed.shape { mix(UInt64(d)) }
            }
        }
        return hash
    }
}
