/// An error of the runtime: a bad option, an exceeded bound, a layer or expert that does not exist.
public struct RuntimeError: Error, Sendable, CustomStringConvertible {
    /// What kind of failure this is; extensible without breaking users.
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        /// The code's name, as printed in messages.
        public let name: String
        /// Creates a code with the given name.
        public init(_ name: String) { self.name = name }
        /// The code's name.
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
        /// Some tokens' input rows held NaN or infinite values: those tokens were not routed, the others were
        /// applied (the call's outputs are written; see ``Runtime/apply(_:input:tokens:output:experts:weights:)``).
        public static let nonFiniteInput = Code("non-finite-input")
    }

    /// What kind of failure this is.
    public let code: Code
    /// What is wrong: what was expected and what was found.
    public let message: String
    /// The error that caused this one, if any.
    public let underlying: (any Error & Sendable)?

    /// Creates an error from its parts.
    public init(_ code: Code, _ message: String, underlying: (any Error & Sendable)? = nil) {
        self.code = code
        self.message = message
        self.underlying = underlying
    }

    /// The message.
    public var description: String { message }
}
