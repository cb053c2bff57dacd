/// An error of the runtime: a bad option, an exceeded bound, a layer or expert that does not exist.
public struct RuntimeError: Error, Sendable, CustomStringConvertible {
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        public let name: String
        public init(_ name: String) { self.name = name }
        public var description: String { name }

        /// An option is out of range.
        public static let option = Code("option")
        /// Too much work is queued; the call was refused at once.
        public static let overloaded = Code("overloaded")
        /// Loading would exceed the memory cap on expert weights.
        public static let memoryCap = Code("memory-cap")
        /// A layer handle or expert name does not exist (any more).
        public static let notFound = Code("not-found")
        /// A buffer has the wrong size for the call.
        public static let shape = Code("shape")
        /// The runtime was shut down.
        public static let shutDown = Code("shut-down")
        /// An expert cannot be added or removed as asked.
        public static let library = Code("library")
    }

    public let code: Code
    public let message: String
    /// The error that caused this one, if any.
    public let underlying: (any Error & Sendable)?

    public init(_ code: Code, _ message: String, underlying: (any Error & Sendable)? = nil) {
        self.code = code
        self.message = message
        self.underlying = underlying
    }

    public var description: String { message }
}
