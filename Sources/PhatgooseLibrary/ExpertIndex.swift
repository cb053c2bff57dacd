/// An expert's position in the library: the order of `experts` in `library.json`, or of the directory scan. It is
/// the expert's identity everywhere: outputs, traces and metrics.
public struct ExpertIndex: Hashable, Comparable, Sendable, CustomStringConvertible {
    public let rawValue: Int32

    public init(_ rawValue: Int) {
        precondition(rawValue >= 0 && rawValue <= Int(Int32.max), "expert index out of range: \(rawValue)")
        self.rawValue = Int32(rawValue)
    }

    public var int: Int { Int(rawValue) }
    public static func < (lhs: ExpertIndex, rhs: ExpertIndex) -> Bool { lhs.rawValue < rhs.rawValue }
    public var description: String { String(rawValue) }
}
