import CPhatgooseSystem
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// Random suffixes for temporary names (the part mkstemp would make).
enum TemporaryName {
    static func suffix() -> String {
        let alphabet = Array("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
        return String((0..<6).map { _ in alphabet[Int.random(in: 0..<alphabet.count)] })
    }
}

/// The process's cleanup registry for temporary files (``AtomicFile``) and directories (``StagedDirectory``).
public enum TemporaryFiles {
    /// Makes SIGINT, SIGTERM, SIGHUP and SIGQUIT remove every registered temporary file and directory before the
    /// process dies of the signal. For command-line tools: a library embedded in someone else's process leaves that
    /// process's signals alone.
    public static func removeOnSignals() {
        _ = pg_cleanup_install_signal_handlers()
    }

    /// Keeps SIGINT, SIGTERM, SIGHUP and SIGQUIT away from the calling helper thread (workers, load-test clients,
    /// servers), so that the thread that creates temporary files is the one that handles them.
    public static func blockInterruptionsInThisThread() {
        pg_cleanup_block_signals_in_this_thread()
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

    /// Whether a file under `directory` (recursively) is `identity`: regular files, and the files symbolic links
    /// point to (the loader follows them); directories are entered only when they are real, not links, so a cycle
    /// of links cannot trap the walk, and a linked directory inside the library is found at its own place.
    private static func containsFile(directory: String, identity target: Identity) -> Bool {
        for name in entries(of: directory) ?? [] {
            let path = directory + "/" + name
            var info = stat()
            guard lstat(path, &info) == 0 else { continue }
            switch info.st_mode & S_IFMT {
            case S_IFREG:
                if Identity(device: UInt64(info.st_dev), inode: UInt64(info.st_ino)) == target { return true }
            case S_IFLNK:
                var resolved = stat()
                if stat(path, &resolved) == 0, (resolved.st_mode & S_IFMT) == S_IFREG,
                   Identity(device: UInt64(resolved.st_dev), inode: UInt64(resolved.st_ino)) == target { return true }
            case S_IFDIR:
                if containsFile(directory: path, identity: target) { return true }
            default: continue
            }
        }
        return false
    }

    /// Removes `path` and, when it is a real directory (not a link to one), everything in it.
    static func removeTree(_ path: String) {
        var info = stat()
        guard lstat(path, &info) == 0 else { return }
        if (info.st_mode & S_IFMT) == S_IFDIR {
            for name in entries(of: path) ?? [] { removeTree(path + "/" + name) }
            rmdir(path)
        } else {
            unlink(path)
        }
    }

    /// The names in a directory other than `.` and `..`, or nil when it cannot be read.
    static func entries(of directory: String) -> [String]? {
        guard let stream = opendir(directory) else { return nil }
        defer { closedir(stream) }
        var names: [String] = []
        while let entry = readdir(stream) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { String(cString: $0.bindMemory(to: CChar.self).baseAddress!) }
            if name != "." && name != ".." { names.append(name) }
        }
        return names
    }
}

/// A directory built in a hidden staging directory next to its destination and renamed into place only by
/// ``commit()``: until then, a failure (or, with ``TemporaryFiles/removeOnSignals()``, SIGINT, SIGTERM or a crash)
/// removes the staging directory with everything in it, so nothing half-written is ever seen at the destination.
///
/// # Thread safety
/// Not thread-safe; one owner builds and commits.
public final class StagedDirectory {
    /// Where the finished directory goes.
    public let destination: String
    /// The staging directory.
    public let path: String
    private let cleanupSlot: Int32
    private var committed = false

    /// Creates the staging directory (0777 less the umask). The destination must not exist, or be an empty directory.
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
        // Registered before it exists (see AtomicFile); the whole tree goes on interruption, one slot for all of it.
        for _ in 0..<100 {
            let candidate = "\(parent.isEmpty ? "" : parent)/.\(base).tmp-\(TemporaryName.suffix())"
            let slot = pg_cleanup_register(candidate, 1)
            guard slot >= 0 else {
                throw FormatError(.io, file: destination, "cannot register a staging directory for removal on interruption (too many at once, or the process is being interrupted)")
            }
            if mkdir(candidate, 0o777) == 0 {
                path = candidate
                cleanupSlot = slot
                return
            }
            let reason = errno
            pg_cleanup_unregister(slot)
            guard reason == EEXIST else {
                throw FormatError(.io, file: destination, "cannot create a staging directory in \(parent.isEmpty ? "/" : parent): \(String(cString: strerror(reason)))")
            }
        }
        throw FormatError(.io, file: destination, "cannot create a staging directory in \(parent.isEmpty ? "/" : parent): every name tried exists")
    }

    /// Makes the subdirectory `relative` of the staging directory and returns its path.
    public func directory(_ relative: String) throws(FormatError) -> String {
        let full = path + "/" + relative
        guard mkdir(full, 0o777) == 0 else {
            throw FormatError(.io, file: destination + "/" + relative, "cannot create the directory: \(String(cString: strerror(errno)))")
        }
        return full
    }

    /// The path of the file `relative` inside the staging directory.
    public func file(_ relative: String) -> String { path + "/" + relative }

    /// Renames the staging directory to the destination.
    public func commit() throws(FormatError) {
        if OutputPath.isDirectory(destination) && Self.isEmptyDirectory(destination) { rmdir(destination) }
        guard rename(path, destination) == 0 else {
            throw FormatError(.io, file: destination, "cannot rename the finished directory into place: \(String(cString: strerror(errno)))")
        }
        committed = true
        pg_cleanup_unregister(cleanupSlot)
    }

    deinit {
        guard !committed else { return }
        OutputPath.removeTree(path)
        pg_cleanup_unregister(cleanupSlot)
    }

    private static func isEmptyDirectory(_ path: String) -> Bool {
        OutputPath.entries(of: path).map { $0.isEmpty } ?? false
    }
}
