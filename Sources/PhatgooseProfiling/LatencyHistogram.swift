import Histogram
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Latencies in an HdrHistogram: microsecond resolution, three significant digits (every value is kept within 0.1%),
/// any range (it grows as needed), fixed memory per decade of range, so recording never allocates per value.
public struct LatencyHistogram: Sendable {
    private var histogram: Histogram<UInt64>

    public init() {
        histogram = Histogram(numberOfSignificantValueDigits: .three)
    }

    /// Records one latency given in nanoseconds (kept in microseconds, rounded up, at least 1).
    public mutating func record(nanoseconds: UInt64) {
        histogram.record(max(1, (nanoseconds + 999) / 1000))
    }

    /// Records one latency given in microseconds.
    public mutating func record(microseconds: UInt64) {
        histogram.record(max(1, microseconds))
    }

    public mutating func merge(_ other: LatencyHistogram) { histogram.add(other.histogram) }
    public mutating func reset() { histogram.reset() }

    public var count: Int { Int(histogram.totalCount) }
    public var isEmpty: Bool { histogram.totalCount == 0 }

    /// Mean in milliseconds (0 when empty).
    public var meanMilliseconds: Double { isEmpty ? 0 : histogram.mean / 1000 }
    /// Standard deviation in milliseconds.
    public var standardDeviationMilliseconds: Double { isEmpty ? 0 : histogram.stdDeviation / 1000 }
    public var minMilliseconds: Double { isEmpty ? 0 : Double(histogram.min) / 1000 }
    public var maxMilliseconds: Double { isEmpty ? 0 : Double(histogram.max) / 1000 }

    /// The value at `percentile` (0...100) in milliseconds: the smallest recorded value that at least `percentile`% of
    /// values are at or below, within the histogram's precision (0 when empty).
    public func milliseconds(atPercentile percentile: Double) -> Double {
        isEmpty ? 0 : Double(histogram.valueAtPercentile(percentile)) / 1000
    }

    public var medianMilliseconds: Double { milliseconds(atPercentile: 50) }

    /// Counts in `buckets` logarithmic buckets between the smallest and largest value: (upper bound in ms, count).
    public func logarithmicBuckets(_ buckets: Int) -> [(upperMilliseconds: Double, count: Int)] {
        guard !isEmpty, buckets >= 1 else { return [] }
        let low = Double(max(1, histogram.min)), high = Double(max(histogram.max, histogram.min + 1))
        let ratio = high / low
        var bounds: [Double] = (1...buckets).map { low * pow(ratio, Double($0) / Double(buckets)) }
        bounds[buckets - 1] = high
        var counts = [Int](repeating: 0, count: buckets)
        for value in histogram.recordedValues() {
            let v = Double(value.value)
            var b = 0
            while b < buckets - 1 && v > bounds[b] { b += 1 }
            counts[b] += Int(value.count)
        }
        return zip(bounds, counts).map { ($0 / 1000, $1) }
    }

    /// Points of the cumulative distribution: (value in ms, fraction of values at or below it), ascending.
    public func cumulativeDistribution() -> [(milliseconds: Double, fraction: Double)] {
        guard !isEmpty else { return [] }
        var points: [(Double, Double)] = []
        var seen: UInt64 = 0
        for value in histogram.recordedValues() {
            seen += value.count
            points.append((Double(value.value) / 1000, Double(seen) / Double(histogram.totalCount)))
        }
        return points
    }
}
