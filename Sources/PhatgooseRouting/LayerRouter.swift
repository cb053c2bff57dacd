import Foundation
import PhatgooseKernels
import PhatgooseLibrary

/// Each token's chosen experts and weights at one module: `slots` entries per token, best first. Padded slots (a
/// module with fewer candidates than k) hold candidate -1 and weight 0. An unrouted token (its row, or its
/// sequence, holds NaN or infinite values: see ``LayerRouter/unroutedTokens(_:tokens:slots:)``) holds candidate -1
/// and weight NaN in every slot, so it gets no delta.
public struct RoutingResult: Sendable {
    /// Tokens routed.
    public var tokenCount: Int
    /// Entries per token.
    public var slots: Int
    /// Position among the module's candidates, [tokens * slots]; -1 for a padded slot.
    public var candidates: [Int32]
    /// Mixture weight, [tokens * slots].
    public var weights: [Float]

    /// Creates a result for `tokenCount` tokens with every slot padded (candidate -1, weight 0).
    public init(tokenCount: Int, slots: Int) {
        self.tokenCount = tokenCount
        self.slots = slots
        candidates = [Int32](repeating: -1, count: tokenCount * slots)
        weights = [Float](repeating: 0, count: tokenCount * slots)
    }
}

/// Chooses experts for the tokens of one module. Built once per module (it holds the matrix scores are taken
/// against: the normalised gates, or Arrow's prototypes), then used for any number of calls.
///
/// # Thread safety
/// Immutable after `init`; `route` writes only into the scratch and result it is given, so one router may serve
/// many threads at once.
public struct LayerRouter: Sendable {
    /// The options the router was built with.
    public let options: RoutingOptions
    /// The module's input width.
    public let inWidth: Int
    /// The module's number of candidate experts.
    public let candidateCount: Int
    /// F32 [candidates, in]: normalised gates (PHATGOOSE) or prototypes (Arrow); unused by the uniform router.
    let scoreMatrix: WeightTensor?
    /// `scoreMatrix` packed into column panels of ``Kernels/panelWidth`` candidates (64-byte aligned), which the
    /// score GEMM reads: built once here, since the matrix is fixed while the router lives. It costs as much memory
    /// again as the matrix (candidates rounded up to a multiple of 16), and measured 1.5-2.2x the dot-product
    /// GEMM's rate with AVX-512 (docs/performance.md).
    let scorePanels: HeapBuffer?
    /// Multiplies every raw score: 1 for PHATGOOSE (the 1/sqrt(in) is in the gates), 1/temperature (and
    /// 1/sqrt(in) when scaled) for Arrow.
    let scoreScale: Float

    /// Builds the router for `module`: takes its gate matrix (PHATGOOSE) or computes Arrow's prototypes.
    /// Throws an `option` error when top-k or the sequence length is below 1, or the Arrow temperature is not a
    /// positive number.
    public init(module: RoutedModule, options: RoutingOptions) throws(RoutingError) {
        guard options.topK >= 1 else { throw RoutingError(.option, "top-k: expected an integer >= 1, found \(options.topK)") }
        if case let .sequence(length) = options.granularity, length < 1 {
            throw RoutingError(.option, "sequence length: expected an integer >= 1, found \(length)")
        }
        self.options = options
        inWidth = module.inWidth
        candidateCount = module.experts.count
        switch options.router {
        case .phatgoose:
            scoreMatrix = module.gateMatrix
            scoreScale = 1
        case .arrow:
            guard options.arrowTemperature.isFinite, options.arrowTemperature > 0 else {
                throw RoutingError(.option, "arrow temperature: expected a positive number, found \(options.arrowTemperature)")
            }
            let prototypes = ArrowPrototypes.compute(module)
            let buffer = HeapBuffer(byteCount: prototypes.count * 4)
            prototypes.withUnsafeBytes { buffer.pointer.copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
            scoreMatrix = WeightTensor(dtype: .f32, shape: [candidateCount, inWidth], owner: buffer, pointer: UnsafeRawPointer(buffer.pointer))
            var scale = 1 / options.arrowTemperature
            if options.arrowScaled { scale *= Float(1.0 / Double(inWidth).squareRoot()) }
            scoreScale = scale
        case .uniform:
            scoreMatrix = nil
            scoreScale = 1
        }
        if let matrix = scoreMatrix {
            let n = candidateCount, k = inWidth
            let panels = HeapBuffer(byteCount: Kernels.panelFloatCount(n: n, k: k) * 4)
            Kernels.packPanels(matrix.pointer.assumingMemoryBound(to: Float.self), ldb: k, n: n, k: k,
                               into: panels.pointer.assumingMemoryBound(to: Float.self))
            scorePanels = panels
        } else {
            scorePanels = nil
        }
    }

    /// Output slots per token.
    public var slots: Int { options.slotsPerToken(candidates: candidateCount) }

    /// Floats of scratch `route` needs for `tokens` tokens.
    public func scratchCount(tokens: Int) -> Int {
        let rows = routedRowCount(tokens: tokens)
        return rows * inWidth * 2 + rows * candidateCount
    }

    /// Rows scored for a call of `tokens` tokens: the tokens, or the sequences.
    public func routedRowCount(tokens: Int) -> Int {
        switch options.granularity {
        case .token: return tokens
        case let .sequence(length): return (tokens + length - 1) / length
        }
    }

    /// Routes `tokens` rows of `x` (leading dimension `ldx`) into `result`, using `scratch` (at least
    /// ``scratchCount(tokens:)`` floats).
    public func route(_ x: UnsafePointer<Float>, ldx: Int, tokens: Int, scratch: UnsafeMutablePointer<Float>,
                      into result: inout RoutingResult) {
        precondition(result.tokenCount == tokens && result.slots == slots, "result sized for another call")
        guard tokens > 0 else { return }
        result.candidates.withUnsafeMutableBufferPointer { candidates in
            result.weights.withUnsafeMutableBufferPointer { weights in
                route(x, ldx: ldx, tokens: tokens, scratch: scratch, candidates: candidates.baseAddress!, weights: weights.baseAddress!)
            }
        }
    }

    /// Routes into raw outputs of `tokens * slots` entries each (for callers that split tokens across threads: the
    /// result of a token does not depend on the other tokens in the call, except that per-sequence routing needs
    /// whole sequences). The same as ``prepare(_:ldx:tokens:scratch:)``, ``score(_:ld:rows:columns:into:)`` over
    /// every candidate, then ``select(_:rows:tokens:candidates:weights:)``.
    public func route(_ x: UnsafePointer<Float>, ldx: Int, tokens: Int, scratch: UnsafeMutablePointer<Float>,
                      candidates: UnsafeMutablePointer<Int32>, weights: UnsafeMutablePointer<Float>) {
        if options.router == .uniform {
            select(scratch, rows: 0, tokens: tokens, candidates: candidates, weights: weights)
            unrouteNonFiniteRows(x, ldx: ldx, tokens: tokens, candidates: candidates, weights: weights)
            return
        }
        let scores = scoresPointer(scratch, tokens: tokens)
        if case .token = options.granularity {
            // Blocks of rows small enough that the normalised rows stay in cache between LayerNorm and the GEMM
            // (each row's result is the same whatever the block).
            var begin = 0
            while begin < tokens {
                let count = min(Self.blockRows, tokens - begin)
                let prepared = prepare(x + begin * ldx, ldx: ldx, tokens: count, scratch: scratch)
                score(prepared.rows, ld: prepared.ld, rows: count, columns: 0..<candidateCount, into: scores + begin * candidateCount)
                begin += count
            }
            select(scores, rows: tokens, tokens: tokens, candidates: candidates, weights: weights)
        } else {
            let prepared = prepare(x, ldx: ldx, tokens: tokens, scratch: scratch)
            score(prepared.rows, ld: prepared.ld, rows: prepared.count, columns: 0..<candidateCount, into: scores)
            select(scores, rows: prepared.count, tokens: tokens, candidates: candidates, weights: weights)
        }
    }

    /// Rows normalised and scored together by ``route(_:ldx:tokens:scratch:candidates:weights:)``.
    static let blockRows = 32

    /// Where the scores live in `scratch` for a call of `tokens` tokens ([routed rows, candidates]).
    public func scoresPointer(_ scratch: UnsafeMutablePointer<Float>, tokens: Int) -> UnsafeMutablePointer<Float> {
        scratch + routedRowCount(tokens: tokens) * inWidth * 2
    }

    /// Step 1: the rows that are scored: layer-normalised tokens (PHATGOOSE) or raw tokens (Arrow); per sequence,
    /// the sequence means first. Uses the first part of `scratch`.
    public func prepare(_ x: UnsafePointer<Float>, ldx: Int, tokens: Int, scratch: UnsafeMutablePointer<Float>)
        -> (rows: UnsafePointer<Float>, ld: Int, count: Int)
    {
        // Scratch layout: [rows * in] normalised rows, [rows * in] sequence means, [rows * n] scores.
        let rows = routedRowCount(tokens: tokens)
        var input = x, ldInput = ldx
        if case let .sequence(length) = options.granularity {
            let meanRows = scratch + rows * inWidth
            for s in 0..<rows {
                let begin = s * length, end = min(tokens, begin + length)
                let mean = meanRows + s * inWidth
                for c in 0..<inWidth { mean[c] = 0 }
                // Sum in F32 in token order, then scale: the same at every split of the call.
                for t in begin..<end {
                    let row = x + t * ldx
                    for c in 0..<inWidth { mean[c] += row[c] }
                }
                let inverse = 1 / Float(end - begin)
                for c in 0..<inWidth { mean[c] *= inverse }
            }
            input = UnsafePointer(meanRows)
            ldInput = inWidth
        }
        guard options.router == .phatgoose else { return (input, ldInput, rows) }
        Kernels.layerNormRows(input, ldx: ldInput, rows: rows, width: inWidth, into: scratch, ldo: inWidth)
        return (UnsafePointer(scratch), inWidth, rows)
    }

    /// Step 2: raw scores of `rows` prepared rows against the candidates in `columns`, into `scores` ([rows,
    /// candidates], leading dimension = candidate count). Each element is computed independently, so callers may
    /// split the rows, or the columns at multiples of ``Kernels/panelWidth`` (see ``scoreColumns(part:of:)``),
    /// across threads and get the same bits.
    public func score(_ prepared: UnsafePointer<Float>, ld: Int, rows: Int, columns: Range<Int>, into scores: UnsafeMutablePointer<Float>) {
        guard !columns.isEmpty, rows > 0 else { return }
        precondition(columns.lowerBound % Kernels.panelWidth == 0 && columns.upperBound <= candidateCount,
                     "score columns must start at a multiple of the panel width")
        let n = candidateCount
        let panels = scorePanels!.pointer.assumingMemoryBound(to: Float.self) + columns.lowerBound * inWidth
        Kernels.gemmPacked(prepared, lda: ld, m: rows, panels, n: columns.count, k: inWidth, alpha: scoreScale,
                           into: scores + columns.lowerBound, ldc: n)
        if options.router == .arrow {
            for r in 0..<rows { for c in columns { scores[r * n + c] = abs(scores[r * n + c]) } }
        }
    }

    /// The columns that participant `part` of `parts` scores when a call splits the candidates: near-equal shares
    /// cut at multiples of ``Kernels/panelWidth`` (an empty range when there are fewer panels than parts).
    public func scoreColumns(part: Int, of parts: Int) -> Range<Int> {
        let panels = (candidateCount + Kernels.panelWidth - 1) / Kernels.panelWidth
        let lower = min(candidateCount, panels * part / parts * Kernels.panelWidth)
        let upper = min(candidateCount, panels * (part + 1) / parts * Kernels.panelWidth)
        return lower..<upper
    }

    /// Step 3: softmax, top-k and renormalisation of each routed row's scores (in place), written to the tokens'
    /// slots; per sequence, copied to every token of the sequence. A row whose scores are not all finite is unrouted
    /// (see ``RoutingResult``). The uniform router ignores the scores (see
    /// ``unrouteNonFiniteRows(_:ldx:tokens:candidates:weights:)``).
    public func select(_ scores: UnsafeMutablePointer<Float>, rows: Int, tokens: Int,
                       candidates: UnsafeMutablePointer<Int32>, weights: UnsafeMutablePointer<Float>) {
        let n = candidateCount
        if options.router == .uniform {
            let weight = Float(1.0 / Double(n))
            for t in 0..<tokens {
                for j in 0..<n {
                    candidates[t * n + j] = Int32(j)
                    weights[t * n + j] = weight
                }
            }
            return
        }
        let k = min(options.topK, n)
        let slots = self.slots
        for row in 0..<rows {
            let p = scores + row * n
            let firstToken = routedFirstToken(row)
            // Scores that are not all finite (a row with NaN or infinite values, or so large that its scores
            // overflow) have no softmax: the row is unrouted.
            guard Self.softmax(p, count: n) else {
                Self.unroute(candidates + firstToken * slots, weights + firstToken * slots, slots: slots)
                continue
            }
            // Top-k by probability; on ties the lower candidate (= lower expert index) wins.
            var sum: Float = 0
            for j in 0..<k {
                var best = -1
                var bestValue = -Float.infinity
                for i in 0..<n where p[i] > bestValue || (best < 0 && p[i] == bestValue) {
                    var taken = false
                    for previous in 0..<j where candidates[firstToken * slots + previous] == Int32(i) { taken = true; break }
                    if !taken { best = i; bestValue = p[i] }
                }
                candidates[firstToken * slots + j] = Int32(best)
                weights[firstToken * slots + j] = bestValue
                sum += bestValue
            }
            let denominator = sum + 1e-6
            for j in 0..<k { weights[firstToken * slots + j] /= denominator }
            for j in k..<slots {
                candidates[firstToken * slots + j] = -1
                weights[firstToken * slots + j] = 0
            }
        }
        if case let .sequence(length) = options.granularity {
            for s in 0..<rows {
                let first = s * length, end = min(tokens, first + length)
                for t in (first + 1)..<max(end, first + 1) {
                    for j in 0..<slots {
                        candidates[t * slots + j] = candidates[first * slots + j]
                        weights[t * slots + j] = weights[first * slots + j]
                    }
                }
            }
        }
    }

    /// The token whose result slots hold routed row `row`: the row itself per token, the first token of the sequence
    /// per sequence (then copied to the rest).
    func routedFirstToken(_ row: Int) -> Int {
        switch options.granularity {
        case .token: return row
        case let .sequence(length): return row * length
        }
    }

    /// In-place softmax in F32 (max subtracted first). Returns false, leaving non-finite values, when the scores
    /// are not all finite.
    static func softmax(_ values: UnsafeMutablePointer<Float>, count: Int) -> Bool {
        var maximum = -Float.infinity
        for i in 0..<count { maximum = max(maximum, values[i]) }
        var sum: Float = 0
        for i in 0..<count {
            let e = expf(values[i] - maximum)
            values[i] = e
            sum += e
        }
        // Finite scores give a sum in [1, count]; a NaN or infinite score makes it NaN.
        guard sum.isFinite else { return false }
        let inverse = 1 / sum
        for i in 0..<count { values[i] *= inverse }
        return true
    }

    /// The uniform router's check, which scores nothing: tokens whose row of `x` holds a NaN or infinite value are
    /// unrouted (the other routers find them through their scores). One pass over the input.
    public func unrouteNonFiniteRows(_ x: UnsafePointer<Float>, ldx: Int, tokens: Int, candidates: UnsafeMutablePointer<Int32>,
                                     weights: UnsafeMutablePointer<Float>) {
        let slots = self.slots
        for t in 0..<tokens where Kernels.nonFiniteCount(x + t * ldx, count: inWidth) > 0 {
            Self.unroute(candidates + t * slots, weights + t * slots, slots: slots)
        }
    }

    /// Marks one token unrouted: candidate -1 and weight NaN in every slot.
    static func unroute(_ candidates: UnsafeMutablePointer<Int32>, _ weights: UnsafeMutablePointer<Float>, slots: Int) {
        for j in 0..<slots {
            candidates[j] = -1
            weights[j] = .nan
        }
    }

    /// The tokens of a routing result ([tokens * slots] candidates) that are unrouted: how many, and the first.
    /// A routed token's first slot always holds a candidate (every module has one), so an unrouted token is one
    /// whose first slot holds -1.
    public static func unroutedTokens(_ candidates: UnsafePointer<Int32>, tokens: Int, slots: Int) -> (count: Int, first: Int?) {
        var count = 0
        var first: Int?
        for t in 0..<tokens where candidates[t * slots] < 0 {
            if first == nil { first = t }
            count += 1
        }
        return (count, first)
    }
}
