/// How unevenly work spreads over bins (experts of a layer, or workers): the largest bin against the mean.
///
/// `maxOverMean` is 1 when every bin holds the same and N when one bin of N holds everything; `excessOverMean`,
/// (max - mean) / mean, is the fraction of extra time the busiest bin adds to a perfectly balanced split. With no
/// bins or nothing in them, both say "balanced" (1 and 0).
public struct LoadImbalance: Sendable, Equatable {
    public var bins: Int
    public var total: Int
    public var max: Int
    /// Index of the fullest bin (the first of equals), or -1 with no bins.
    public var argmax: Int

    public init<C: Collection>(counts: C) where C.Element == Int {
        bins = counts.count
        total = counts.reduce(0, +)
        var best = -1, bestValue = Int.min
        for (i, c) in counts.enumerated() where c > bestValue {
            best = i
            bestValue = c
        }
        argmax = best
        max = best < 0 ? 0 : bestValue
    }

    public var mean: Double { bins == 0 ? 0 : Double(total) / Double(bins) }
    public var maxOverMean: Double { mean > 0 ? Double(max) / mean : 1 }
    public var excessOverMean: Double { mean > 0 ? (Double(max) - mean) / mean : 0 }
}
