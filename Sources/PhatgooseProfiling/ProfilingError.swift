/// An error of the profiling module: a file that cannot be read or written, or a summary that is not one.
public struct ProfilingError: Error, Sendable, CustomStringConvertible {
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        public let name: String
        public init(_ name: String) { self.name = name }
        public var description: String { name }

        /// A file could not be read or written.
        public static let io = Code("io")
        /// A file is not what the profiler wrote (for example, not a run summary).
        public static let format = Code("format")
    }

    public let code: Code
    /// The file the problem is in.
    public let file: String
    /// What was expected and what was found.
    public let message: String
    /// The error that caused this one, if any.
    public let underlying: (any Error & Sendable)?

    public init(_ code: Code, file: String, _ message: String, underlying: (any Error & Sendable)? = nil) {
        self.code = code
        self.file = file
        self.message = message
        self.underlying = underlying
    }

    public var description: String { "\(file): \(message)" }
}
