/// A parsed JSON value that keeps what the file said exactly: object keys in file order, and numbers as written,
/// so a reader can tell `16` from `16.0` and refuse a fractional dimension.
public enum JSONValue: Sendable, Equatable {
    /// The literal `null`.
    case null
    /// The literal `true` or `false`.
    case bool(Bool)
    /// A number with its literal text (RFC 8259 grammar, already validated).
    case number(JSONNumber)
    /// A string, with its escapes decoded.
    case string(String)
    /// An array, elements in file order.
    case array([JSONValue])
    /// Members in file order. Duplicate keys are refused by the parser.
    case object([(key: String, value: JSONValue)])

    /// Structural equality; objects are equal only when their members match in the same order.
    public static func == (lhs: JSONValue, rhs: JSONValue) -> Bool {
        switch (lhs, rhs) {
        case (.null, .null): return true
        case let (.bool(a), .bool(b)): return a == b
        case let (.number(a), .number(b)): return a == b
        case let (.string(a), .string(b)): return a == b
        case let (.array(a), .array(b)): return a == b
        case let (.object(a), .object(b)):
            return a.count == b.count && zip(a, b).allSatisfy { $0.key == $1.key && $0.value == $1.value }
        default: return false
        }
    }

    /// A short name of the value's kind, for error messages ("a string", "an array", ...).
    public var kindDescription: String {
        switch self {
        case .null: return "null"
        case .bool: return "a boolean"
        case let .number(n): return n.isInteger ? "the integer \(n.text)" : "the number \(n.text)"
        case .string: return "a string"
        case .array: return "an array"
        case .object: return "an object"
        }
    }

    /// The member named `key` of an object, or nil.
    public subscript(key: String) -> JSONValue? {
        guard case let .object(members) = self else { return nil }
        return members.first { $0.key == key }?.value
    }
}

/// A JSON number literal.
public struct JSONNumber: Sendable, Equatable {
    /// The literal as written in the file.
    public let text: String
    /// True when the literal has no fraction and no exponent (`12`, `-3`), false for `12.0` or `1e3`.
    public let isInteger: Bool

    /// Creates a number from its literal text and whether that literal is an integer.
    public init(text: String, isInteger: Bool) {
        self.text = text
        self.isInteger = isInteger
    }

    /// The value as a signed 64-bit integer when the literal is an integer that fits.
    public var int64: Int64? { isInteger ? Int64(text) : nil }
    /// The value as a non-negative integer when the literal is a non-negative integer that fits in UInt64.
    public var uint64: UInt64? { isInteger ? UInt64(text) : nil }
    /// The value as a Double (may round).
    public var double: Double { Double(text) ?? .nan }
}
