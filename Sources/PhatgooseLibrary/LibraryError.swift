/// An error building an expert library, naming the file, the expert and module or field, what was expected and what
/// was found. Errors of the underlying formats (`FormatError`) pass through unchanged.
public struct LibraryError: Error, Sendable, CustomStringConvertible {
    /// What kind of failure this is; extensible without breaking users.
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        /// The code's name, as printed in messages.
        public let name: String
        /// Creates a code with the given name.
        public init(_ name: String) { self.name = name }
        /// The code's name.
        public var description: String { name }

        /// `adapter_config.json` is missing a field, has a wrong type, or asks for something the runtime cannot honour.
        public static let config = Code("config")
        /// `library.json` is malformed or names experts that cannot be used.
        public static let manifest = Code("manifest")
        /// The adapter's tensors are missing, unpaired, unknown or of the wrong shape.
        public static let adapter = Code("adapter")
        /// A gate is missing, extra or of the wrong shape.
        public static let gate = Code("gate")
        /// Experts disagree about a module's widths.
        public static let mismatch = Code("mismatch")
        /// A tensor holds NaN or infinite values.
        public static let values = Code("values")
        /// The library as a whole cannot be used (no experts, not a library).
        public static let library = Code("library")
    }

    /// What kind of failure this is.
    public let code: Code
    /// The file the problem is in.
    public let file: String
    /// The expert, module, tensor or field at fault, if any.
    public let subject: String?
    /// What was expected and what was found.
    public let message: String

    /// Creates an error from its parts.
    public init(_ code: Code, file: String, subject: String? = nil, _ message: String) {
        self.code = code
        self.file = file
        self.subject = subject
        self.message = message
    }

    /// `file: subject: message`, or `file: message` when there is no subject.
    public var description: String {
        if let subject { return "\(file): \(subject): \(message)" }
        return "\(file): \(message)"
    }
}
