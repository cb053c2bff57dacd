/// An error of the load test: a bad option, or a library it cannot drive.
public struct LoadTestError: Error, Sendable, CustomStringConvertible {
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        public let name: String
        public init(_ name: String) { self.name = name }
        public var description: String { name }

        /// An option is out of range.
        public static let option = Code("option")
        /// The library cannot be driven (no routed layer, or no F32 gate matrix).
        public static let library = Code("library")
        /// A file or socket could not be used.
        public static let io = Code("io")
        /// Requests failed with errors other than overload during the run.
        public static let failedRequests = Code("failed-requests")
    }

    public let code: Code
    public let message: String
    public let underlying: (any Error & Sendable)?

    public init(_ code: Code, _ message: String, underlying: (any Error & Sendable)? = nil) {
        self.code = code
        self.message = message
        self.underlying = underlying
    }

    public var description: String { message }
}
