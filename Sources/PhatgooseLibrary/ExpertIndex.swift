/// An expert's position in the library: the order of `experts` in `library.json`, or of the directory scan. It is
/// the expert's identity everywhere: outputs, traces and metrics.
public struct ExpertIndex: Hashable, Comparable, Sendable, CustomStringConvertible {
    /// The position, as a 32-bit integer.
    public let rawValue: Int32

    /// Creates an index for a position; traps unless it is in `0...Int32.max`.
    public init(_ rawValue: Int) {
        precondition(rawValue >= 0 && rawValue <= Int(Int32.max), "expert index out of range: \(rawValue)")
        self.rawValue = Int32(rawValue)
    }

    /// The position as an `Int`, for indexing arrays.
    public var int: Int { Int(rawValue) }
    /// Orders indices by position.
    public static func < (lhs: ExpertIndex, rhs: ExpertIndex) -> Bool { lhs.rawValue < rhs.rawValue }
    /// The position in decimal.
    public var description: String { String(rawValue) }
}
