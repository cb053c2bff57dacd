/// What a load test sends and for how long. See `docs/loadtest.md`.
public struct LoadTestOptions: Sendable, Equatable {
    /// How requests arrive.
    public enum Loop: Sendable, Equatable {
        /// `clients` threads, each sending its next request as soon as the previous one finishes.
        case closed(clients: Int)
        /// Requests arrive at `rate` per second, gaps gamma-distributed with shape `burstiness` (1: Poisson), whether
        /// or not earlier ones have finished; at most `maxConcurrency` are in flight, later arrivals wait (their
        /// queueing time).
        case open(rate: Double, burstiness: Double, maxConcurrency: Int)
    }

    public var loop: Loop
    /// Seconds of measurement after the warm-up; nil with a request count.
    public var duration: Double?
    /// Measured requests to complete (the run ends when they have); nil with a duration.
    public var requests: Int?
    /// Seconds of warm-up, excluded from every figure.
    public var warmup: Double
    /// Most seconds to wait, after the measured window, for measured requests still in flight; those left are
    /// abandoned and counted as unfinished.
    public var drainTimeout: Double
    /// Share of decode-like requests; the rest are prefill-like.
    public var decodeFraction: Double
    /// Tokens of a decode-like request (uniform in the range).
    public var decodeTokens: ClosedRange<Int>
    /// Tokens of a prefill-like request (uniform in the range).
    public var prefillTokens: ClosedRange<Int>
    /// How strongly a request's tokens lean towards its profile expert's gate (0: not at all). See ``ModelWorkload``.
    public var affinity: Double
    /// Zipf exponent of how often each expert is a request's profile expert (0: uniform).
    public var skew: Double
    public var seed: UInt64
    /// Seconds between progress reports (and metric samples).
    public var progressInterval: Double

    public init(loop: Loop = .closed(clients: 4), duration: Double? = 20, requests: Int? = nil, warmup: Double = 3,
                drainTimeout: Double = 10, decodeFraction: Double = 0.8, decodeTokens: ClosedRange<Int> = 1...16,
                prefillTokens: ClosedRange<Int> = 128...512, affinity: Double = 0.35, skew: Double = 1, seed: UInt64 = 0,
                progressInterval: Double = 1) {
        self.loop = loop
        self.duration = duration
        self.requests = requests
        self.warmup = warmup
        self.drainTimeout = drainTimeout
        self.decodeFraction = decodeFraction
        self.decodeTokens = decodeTokens
        self.prefillTokens = prefillTokens
        self.affinity = affinity
        self.skew = skew
        self.seed = seed
        self.progressInterval = progressInterval
    }

    /// Throws `LoadTestError(.option)` naming the first option out of range, spelled as the command line spells it.
    public func validate() throws {
        func bad(_ message: String) -> LoadTestError { LoadTestError(.option, message) }
        switch loop {
        case let .closed(clients):
            guard clients >= 1 && clients <= 4096 else { throw bad("--clients: expected 1 to 4096, found \(clients)") }
        case let .open(rate, burstiness, maxConcurrency):
            guard rate.isFinite && rate > 0 else { throw bad("--rate: expected requests per second > 0, found \(rate)") }
            guard burstiness.isFinite && burstiness > 0 else { throw bad("--burstiness: expected a number > 0 (1 is Poisson), found \(burstiness)") }
            guard maxConcurrency >= 1 && maxConcurrency <= 4096 else { throw bad("--max-concurrency: expected 1 to 4096, found \(maxConcurrency)") }
        }
        guard (duration == nil) != (requests == nil) else { throw bad("--duration, --requests: expected either a duration or a request count, found \(duration == nil ? "neither" : "both")") }
        if let duration { guard duration.isFinite && duration > 0 else { throw bad("--duration: expected seconds > 0, found \(duration)") } }
        if let requests { guard requests >= 1 else { throw bad("--requests: expected at least 1, found \(requests)") } }
        guard warmup.isFinite && warmup >= 0 else { throw bad("--warmup: expected seconds >= 0, found \(warmup)") }
        guard drainTimeout.isFinite && drainTimeout >= 0 else { throw bad("--drain-timeout: expected seconds >= 0, found \(drainTimeout)") }
        guard decodeFraction >= 0 && decodeFraction <= 1 else { throw bad("--decode-fraction: expected 0 to 1, found \(decodeFraction)") }
        guard decodeTokens.lowerBound >= 1 else { throw bad("--decode-tokens: expected at least 1, found \(decodeTokens.lowerBound)") }
        guard prefillTokens.lowerBound >= 1 else { throw bad("--prefill-tokens: expected at least 1, found \(prefillTokens.lowerBound)") }
        guard maxTokens <= 65_536 else { throw bad("--decode-tokens, --prefill-tokens: tokens per request: expected at most 65536, found \(maxTokens)") }
        guard affinity.isFinite && affinity >= 0 else { throw bad("--affinity: expected a number >= 0, found \(affinity)") }
        guard skew.isFinite && skew >= 0 else { throw bad("--skew: expected a number >= 0, found \(skew)") }
        guard progressInterval.isFinite && progressInterval > 0 else { throw bad("--progress-interval: expected seconds > 0, found \(progressInterval)") }
    }

    /// The largest request, in tokens.
    public var maxTokens: Int {
        max(decodeFraction > 0 ? decodeTokens.upperBound : 0, decodeFraction < 1 ? prefillTokens.upperBound : 0, 1)
    }

    /// Client threads the loop uses.
    public var clientThreads: Int {
        switch loop {
        case let .closed(clients): return clients
        case let .open(_, _, maxConcurrency): return maxConcurrency
        }
    }
}
