#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// SplitMix64 seeded from several words: every request, arrival gap and noise value of a run derives from
/// (seed, what, index), so the same options give the same workload whatever the thread timing.
struct LoadRandom {
    private var state: UInt64

    init(_ words: UInt64...) {
        state = 0x243F_6A88_85A3_08D3
        for word in words { state = Self.mix(state ^ (word &+ 0x9E37_79B9_7F4A_7C15)) }
    }

    static func mix(_ value: UInt64) -> UInt64 {
        var z = value &+ 0x9E37_79B9_7F4A_7C15
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    mutating func next() -> UInt64 {
        state = state &+ 0x9E37_79B9_7F4A_7C15
        return Self.mix(state &- 0x9E37_79B9_7F4A_7C15)
    }

    /// Uniform in [0, 1).
    mutating func unit() -> Double { Double(next() >> 11) * 0x1p-53 }

    /// Uniform integer in `range`.
    mutating func integer(in range: ClosedRange<Int>) -> Int {
        range.lowerBound + Int(next() % UInt64(range.upperBound - range.lowerBound + 1))
    }

    /// Standard normal (Box-Muller).
    mutating func normal() -> Double {
        let u1 = max(unit(), 0x1p-53), u2 = unit()
        return (-2 * log(u1)).squareRoot() * cos(2 * Double.pi * u2)
    }

    /// Gamma(shape, 1) by Marsaglia and Tsang; shape < 1 through the boost Gamma(shape + 1) * U^(1/shape).
    mutating func gamma(shape: Double) -> Double {
        if shape < 1 {
            return gamma(shape: shape + 1) * pow(max(unit(), 0x1p-53), 1 / shape)
        }
        let d = shape - 1.0 / 3, c = 1 / (9 * d).squareRoot()
        while true {
            var x: Double, v: Double
            repeat {
                x = normal()
                v = 1 + c * x
            } while v <= 0
            v = v * v * v
            let u = unit()
            if u < 1 - 0.0331 * x * x * x * x { return d * v }
            if log(max(u, 0x1p-300)) < 0.5 * x * x + d * (1 - v + log(v)) { return d * v }
        }
    }
}

/// Gaps between arrivals: gamma-distributed with shape `burstiness` and mean 1/rate, so burstiness 1 is a Poisson
/// process, below 1 burstier (gaps cluster), above 1 more regular. The same definition as vLLM's benchmark.
struct ArrivalProcess {
    let rate: Double
    let burstiness: Double
    private var random: LoadRandom

    init(rate: Double, burstiness: Double, seed: UInt64) {
        self.rate = rate
        self.burstiness = burstiness
        random = LoadRandom(seed, 0xA7)
    }

    /// The next gap, in seconds.
    mutating func nextGap() -> Double {
        random.gamma(shape: burstiness) / (burstiness * rate)
    }
}
