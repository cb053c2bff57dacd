#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// A read-only memory mapping of a whole file.
///
/// # Thread safety
/// Immutable after `init`: the mapping is read-only and unmapped only in `deinit`, when no reference remains, so
/// sharing it across threads is safe; that is why it is `@unchecked Sendable`.
public final class MappedFile: @unchecked Sendable {
    /// The path the file was opened from.
    public let path: String
    /// The mapped bytes (empty for an empty file). Valid as long as this object lives.
    public let bytes: UnsafeRawBufferPointer

    private let ownsHeapCopy: Bool

    /// Holds a private copy of `bytes` under the name `path` (for bytes that did not come from a file: fuzzing,
    /// network buffers). Readers treat it exactly like a mapping.
    public init(copying bytes: UnsafeRawBufferPointer, path: String) {
        self.path = path
        ownsHeapCopy = true
        let copy = UnsafeMutableRawPointer.allocate(byteCount: max(bytes.count, 1), alignment: 64)
        if let base = bytes.baseAddress { copy.copyMemory(from: base, byteCount: bytes.count) }
        self.bytes = UnsafeRawBufferPointer(start: copy, count: bytes.count)
    }

    /// Maps `path` read-only.
    public init(path: String) throws(FormatError) {
        self.path = path
        ownsHeapCopy = false
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw FormatError(.io, file: path, "cannot open: \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        var info = stat()
        guard fstat(fd, &info) == 0 else {
            throw FormatError(.io, file: path, "cannot stat: \(String(cString: strerror(errno)))")
        }
        guard (info.st_mode & S_IFMT) == S_IFREG else {
            throw FormatError(.io, file: path, "expected a regular file, found another kind of file")
        }
        let size = Int(info.st_size)
        if size == 0 {
            bytes = UnsafeRawBufferPointer(start: nil, count: 0)
            return
        }
        guard let base = mmap(nil, size, PROT_READ, MAP_PRIVATE, fd, 0), base != MAP_FAILED else {
            throw FormatError(.io, file: path, "cannot map \(size) bytes: \(String(cString: strerror(errno)))")
        }
        bytes = UnsafeRawBufferPointer(start: base, count: size)
    }

    /// Lets the kernel drop the mapping's resident pages (they are read again from the file when touched), so that
    /// streaming through a file larger than memory keeps the process's resident size bounded. No effect on a copy.
    public func dropResidentPages() {
        guard !ownsHeapCopy, let base = bytes.baseAddress else { return }
        _ = madvise(UnsafeMutableRawPointer(mutating: base), bytes.count, MADV_DONTNEED)
    }

    deinit {
        guard let base = bytes.baseAddress else { return }
        if ownsHeapCopy {
            UnsafeMutableRawPointer(mutating: base).deallocate()
        } else {
            munmap(UnsafeMutableRawPointer(mutating: base), bytes.count)
        }
    }
}
