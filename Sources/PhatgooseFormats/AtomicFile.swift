import CPhatgooseSystem
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// Writes a file so that it appears whole or not at all: data goes to a hidden temporary file in the same directory,
/// which is renamed over the destination only by ``commit()``. If the writer is dropped without committing, the
/// temporary file is removed, so no failure ever leaves a partial output behind. The temporary file is also in the
/// process's cleanup registry, so a command that installed ``TemporaryFiles/removeOnSignals()`` leaves nothing behind
/// when SIGINT or SIGTERM interrupts it mid-write.
///
/// # Thread safety
/// Not thread-safe; one owner writes and commits.
public final class AtomicFile {
    /// The destination path; the finished file is renamed to it by ``commit()``.
    public let path: String
    private let temporaryPath: String
    private var fd: Int32
    private var committed = false
    private let cleanupSlot: Int32
    private var buffer: [UInt8] = []
    private static let bufferLimit = 1 << 20

    /// Creates the temporary file next to `path`, with the permissions a new file gets (0666 less the umask).
    public init(path: String) throws(FormatError) {
        self.path = path
        let slash = path.lastIndex(of: "/")
        let directory = slash.map { String(path[..<$0]) } ?? "."
        let base = slash.map { String(path[path.index(after: $0)...]) } ?? path
        // Registered before it exists, so that no signal can find it unregistered; O_EXCL makes the name ours.
        for _ in 0..<100 {
            let candidate = "\(directory.isEmpty ? "" : directory)/.\(base).tmp-\(TemporaryName.suffix())"
            let slot = pg_cleanup_register(candidate, 0)
            guard slot >= 0 else {
                throw FormatError(.io, file: path, "cannot register a temporary file for removal on interruption (too many open at once, or the process is being interrupted)")
            }
            let fd = open(candidate, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o666)
            if fd >= 0 {
                self.fd = fd
                self.temporaryPath = candidate
                self.cleanupSlot = slot
                return
            }
            let reason = errno
            pg_cleanup_unregister(slot)
            guard reason == EEXIST else {
                throw FormatError(.io, file: path, "cannot create a temporary file in \(directory.isEmpty ? "/" : directory): \(String(cString: strerror(reason)))")
            }
        }
        throw FormatError(.io, file: path, "cannot create a temporary file in \(directory.isEmpty ? "/" : directory): every name tried exists")
    }

    /// Appends bytes.
    public func write(_ bytes: UnsafeRawBufferPointer) throws(FormatError) {
        if buffer.count + bytes.count > Self.bufferLimit { try flush() }
        if bytes.count >= Self.bufferLimit {
            try writeAll(bytes)
        } else {
            buffer.append(contentsOf: bytes)
        }
    }

    /// Appends bytes.
    public func write(_ bytes: [UInt8]) throws(FormatError) {
        if buffer.count + bytes.count > Self.bufferLimit { try flush() }
        buffer.append(contentsOf: bytes)
    }

    /// Appends a little-endian u64.
    public func write(littleEndian value: UInt64) throws(FormatError) {
        var bytes = [UInt8](repeating: 0, count: 8)
        for i in 0..<8 { bytes[i] = UInt8(truncatingIfNeeded: value >> (8 * UInt64(i))) }
        try write(bytes)
    }

    /// Appends `count` zero bytes.
    public func writeZeros(_ count: Int) throws(FormatError) {
        try write([UInt8](repeating: 0, count: count))
    }

    private func flush() throws(FormatError) {
        guard !buffer.isEmpty else { return }
        let pending = buffer
        buffer.removeAll(keepingCapacity: true)
        let base = pending.withUnsafeBytes { $0.baseAddress! }
        // `pending` stays alive until the end of this scope; the pointer is used only within it.
        try withExtendedLifetime(pending) { () throws(FormatError) in
            try writeAll(UnsafeRawBufferPointer(start: base, count: pending.count))
        }
    }

    private func writeAll(_ bytes: UnsafeRawBufferPointer) throws(FormatError) {
        var offset = 0
        while offset < bytes.count {
            let n = Glibc.write(fd, bytes.baseAddress! + offset, bytes.count - offset)
            if n < 0 {
                if errno == EINTR { continue }
                throw FormatError(.io, file: path, "cannot write: \(String(cString: strerror(errno)))")
            }
            offset += n
        }
    }

    /// Flushes, closes and renames the temporary file over `path`.
    public func commit() throws(FormatError) {
        try flush()
        guard close(fd) == 0 else {
            fd = -1
            throw FormatError(.io, file: path, "cannot close: \(String(cString: strerror(errno)))")
        }
        fd = -1
        guard rename(temporaryPath, path) == 0 else {
            throw FormatError(.io, file: path, "cannot rename the finished file into place: \(String(cString: strerror(errno)))")
        }
        committed = true
        pg_cleanup_unregister(cleanupSlot)
    }

    deinit {
        if fd >= 0 { close(fd) }
        if !committed {
            unlink(temporaryPath)
            pg_cleanup_unregister(cleanupSlot)
        }
    }
}
