/// An error reading or writing a Phatgoose file, naming the file, the tensor or field, what was expected and what was
/// found.
public struct FormatError: Error, Sendable, CustomStringConvertible {
    /// What kind of failure this is; extensible without breaking users.
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        /// The code's name, as printed in messages.
        public let name: String
        /// Creates a code with the given name.
        public init(_ name: String) { self.name = name }
        /// The code's name.
        public var description: String { name }

        /// The file could not be opened, mapped, read or written.
        public static let io = Code("io")
        /// A safetensors file breaks the format.
        public static let safetensors = Code("safetensors")
        /// A JSON document is malformed or has a field of the wrong type.
        public static let json = Code("json")
        /// A tensor holds values that cannot be used (NaN, infinity, a dtype this use cannot take).
        public static let values = Code("values")
        /// A packed library breaks its format.
        public static let packed = Code("packed")
        /// A zip archive is truncated, damaged or uses a feature that is not read (compression, encryption).
        public static let zip = Code("zip")
        /// A pickle is malformed, or asks for a global (code) that reading a tensor state dict does not need.
        public static let pickle = Code("pickle")
        /// A PyTorch checkpoint's structure is not what was expected (layout, storages, tensors, keys).
        public static let checkpoint = Code("checkpoint")
    }

    /// What kind of failure this is.
    public let code: Code
    /// The file the problem is in.
    public let file: String
    /// The tensor or field at fault, if any (for example `tensor 'x'` or `field "r"`).
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
