import CPhatgooseSystem
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The process's cleanup registry for temporary files (``AtomicFile``) and directories (``StagedDirectory``).
public enum TemporaryFiles {
    /// Makes SIGINT, SIGTERM, SIGHUP and SIGQUIT remove every registered temporary file and directory before the
    /// process dies of the signal. For command-line tools: a library embedded in someone else's process leaves that
    /// process's signals alone.
    public static func removeOnSignals() {
        _ = pg_cleanup_install_signal_handlers()
    }
}

/// Checks that an output does not destroy an input: a file a command writes must not be, or resolve to (through
/// symbolic links, hard links or `..`), a file it reads or a file inside a directory it reads.
public enum OutputPath {
    /// The absolute path `path` resolves to; for a path that does not exist yet, its resolved parent directory plus
    /// its last component.
    public static func resolved(_ path: String) -> String {
        if let real = realPath(path) { return real }
        let slash = path.lastIndex(of: "/")
        let parent = slash.map { String(path[..<$0]) } ?? "."
        let base = slash.map { String(path[path.index(after: $0)...]) } ?? path
        let resolvedParent = realPath(parent.isEmpty ? "/" : parent) ?? parent
        return (resolvedParent == "/" ? "" : resolvedParent) + "/" + base
    }

    /// Throws when writing `output` (named by the option `option`, such as `--output`) would replace or write into
    /// one of `inputs` (files, or directories whose every file is an input).
    public static func refuseOverwriting(_ output: String, option: String, inputs: [String]) throws(FormatError) {
        let target = resolved(output)
        let outputIdentity = identity(output)
        for input in inputs {
            let source = resolved(input)
            func refuse(_ why: String) -> FormatError {
                FormatError(.io, file: output, subject: option, "expected a path that is not an input of this command, found \(why); nothing was written")
            }
            if isDirectory(source) {
                if target == source || target.hasPrefix(source + "/") {
                    throw refuse("a path inside \(input), which this command reads")
                }
                // A hard link elsewhere to a file of the directory is the same file.
                if let outputIdentity, containsFile(directory: source, identity: outputIdentity) {
                    throw refuse("a hard link to a file inside \(input), which this command reads")
                }
            } else if target == source {
                throw refuse("\(input), which this command reads")
            } else if let outputIdentity, outputIdentity == identity(input) {
                throw refuse("a hard link to \(input), which this command reads")
            }
        }
    }

    private struct Identity: Equatable { let device: UInt64, inode: UInt64 }

    private static func identity(_ path: String) -> Identity? {
        var info = stat()
        guard stat(path, &info) == 0 else { return nil }
        return Identity(device: UInt64(info.st_dev), inode: UInt64(info.st_ino))
    }

    private static func realPath(_ path: String) -> String? {
        guard let resolved = realpath(path, nil) else { return nil }
        defer { free(resolved) }
        return String(cString: resolved)
    }

    static func isDirectory(_ path: String) -> Bool {
        var info = stat()
        return stat(path, &info) == 0 && (info.st_mode & S_IFMT) == S_IFDIR
    }

    /// Whether a regular file under `directory` (recursively, not following symbolic links) is `identity`.
    private static func containsFile(directory: String, identity target: Identity) -> Bool {
        guard let stream = opendir(directory) else { return false }
        defer { closedir(stream) }
        while let entry = readdir(stream) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { String(cString: $0.bindMemory(to: CChar.self).baseAddress!) }
            if name == "." || name == ".." { continue }
            let path = directory + "/" + name
            var info = stat()
            guard lstat(path, &info) == 0 else { continue }
            switch info.st_mode & S_IFMT {
            case S_IFREG:
                if Identity(device: UInt64(info.st_dev), inode: UInt64(info.st_ino)) == target { return true }
            case S_IFDIR:
                if containsFile(directory: path, identity: target) { return true }
            default: continue
            }
        }
        return false
    }
}

/// A directory built in a hidden staging directory next to its destination and renamed into place only by
/// ``commit()``: until then, a failure (or, with ``TemporaryFiles/removeOnSignals()``, SIGINT or SIGTERM) removes
/// every file and directory made inside it, so nothing half-written is ever seen at the destination.
///
/// Files must be written through paths from ``file(_:)`` (which registers them first), directories made with
/// ``directory(_:)``.
///
/// # Thread safety
/// Not thread-safe; one owner builds and commits.
public final class StagedDirectory {
    /// Where the finished directory goes.
    public let destination: String
    /// The staging directory.
    public let path: String
    private var registered: [(slot: Int32, path: String, isDirectory: Bool)] = []
    private var committed = false

    /// Creates the staging directory. The destination must not exist, or be an empty directory.
    public init(destination: String) throws(FormatError) {
        var trimmed = destination
        while trimmed.count > 1 && trimmed.hasSuffix("/") { trimmed.removeLast() }
        self.destination = trimmed
        if OutputPath.isDirectory(trimmed) {
            guard Self.isEmptyDirectory(trimmed) else {
                throw FormatError(.io, file: destination, "expected a new or empty directory to write into, found one with files in it (nothing is overwritten)")
            }
        } else if access(trimmed, F_OK) == 0 {
            throw FormatError(.io, file: destination, "expected a new or empty directory to write into, found an existing file")
        }
        let slash = trimmed.lastIndex(of: "/")
        let parent = slash.map { String(trimmed[..<$0]) } ?? "."
        let base = slash.map { String(trimmed[trimmed.index(after: $0)...]) } ?? trimmed
        var template = Array("\(parent.isEmpty ? "" : parent)/.\(base).tmp-XXXXXX".utf8CString)
        var slot: Int32 = -1
        guard template.withUnsafeMutableBufferPointer({ pg_cleanup_mkdtemp($0.baseAddress!, &slot) }) != nil else {
            throw FormatError(.io, file: destination, "cannot create a staging directory in \(parent.isEmpty ? "/" : parent): \(String(cString: strerror(errno)))")
        }
        path = template.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }
        registered.append((slot, path, true))
        // mkdtemp makes the directory private (0700); the finished library gets the usual permissions.
        let mask = umask(0)
        umask(mask)
        chmod(path, 0o777 & ~mask)
    }

    /// Makes the subdirectory `relative` of the staging directory and returns its path.
    public func directory(_ relative: String) throws(FormatError) -> String {
        let full = path + "/" + relative
        registered.append((pg_cleanup_register(full, 1), full, true))
        guard mkdir(full, 0o755) == 0 else {
            throw FormatError(.io, file: destination + "/" + relative, "cannot create the directory: \(String(cString: strerror(errno)))")
        }
        return full
    }

    /// The path of the file `relative` inside the staging directory, registered for removal until ``commit()``.
    public func file(_ relative: String) -> String {
        let full = path + "/" + relative
        registered.append((pg_cleanup_register(full, 0), full, false))
        return full
    }

    /// Renames the staging directory to the destination.
    public func commit() throws(FormatError) {
        if OutputPath.isDirectory(destination) && Self.isEmptyDirectory(destination) { rmdir(destination) }
        guard rename(path, destination) == 0 else {
            throw FormatError(.io, file: destination, "cannot rename the finished directory into place: \(String(cString: strerror(errno)))")
        }
        committed = true
        for entry in registered { pg_cleanup_unregister(entry.slot) }
        registered.removeAll()
    }

    deinit {
        guard !committed else { return }
        for entry in registered where !entry.isDirectory { unlink(entry.path) }
        for entry in registered.reversed() where entry.isDirectory { rmdir(entry.path) }
        for entry in registered { pg_cleanup_unregister(entry.slot) }
    }

    private static func isEmptyDirectory(_ path: String) -> Bool {
        guard let stream = opendir(path) else { return false }
        defer { closedir(stream) }
        while let entry = readdir(stream) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { String(cString: $0.bindMemory(to: CChar.self).baseAddress!) }
            if name != "." && name != ".." { return false }
        }
        return true
    }
}
