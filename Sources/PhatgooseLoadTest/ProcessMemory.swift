#if canImport(Glibc)
import Glibc
#endif

/// The process's resident memory.
public enum ProcessMemory {
    /// Resident set size in bytes, from /proc/self/statm; 0 where that is unavailable.
    public static func residentBytes() -> Int {
        #if os(Linux)
        guard let file = fopen("/proc/self/statm", "r") else { return 0 }
        defer { fclose(file) }
        var buffer = [CChar](repeating: 0, count: 128)
        guard fgets(&buffer, Int32(buffer.count), file) != nil else { return 0 }
        let fields = String(cString: buffer).split(separator: " ")
        guard fields.count >= 2, let pages = Int(fields[1]) else { return 0 }
        return pages * sysconf(Int32(_SC_PAGESIZE))
        #else
        return 0
        #endif
    }
}
