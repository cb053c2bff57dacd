import PhatgooseKernels
import PhatgooseLibrary

/// The dense baseline (as microsoft/mttl runs mixtures): every expert chosen by at least one token of the batch runs
/// on every token, and its output is weighted per token (0 where the token did not choose it). Same routing and
/// kernels as the grouped executor; only the grouping differs.
public final class DenseExecutor {
    /// Each token's choices in the last call of `apply`.
    public private(set) var routing = RoutingResult(tokenCount: 0, slots: 0)
    private let routeScratch = ScratchBuffer()
    private let rows = ScratchBuffer()
    private let shrunk = ScratchBuffer()
    private let tokenWeights = ScratchBuffer()

    /// Creates an executor with empty scratch.
    public init() {}

    /// Routes and applies `module` to `tokens` rows of `x`, adding the mixture delta into `out`: every expert
    /// that any token chose runs on every token of the batch, weighted 0 where the token did not choose it.
    public func apply(_ module: RoutedModule, router: LayerRouter, x: UnsafePointer<Float>, ldx: Int, tokens: Int,
                      out: UnsafeMutablePointer<Float>, ldo: Int) {
        routing.route(router, x: x, ldx: ldx, tokens: tokens, scratch: routeScratch)
        let y = rows.reserve(tokens * module.outWidth)
        let h = shrunk.reserve(tokens * module.experts.reduce(0) { max($0, $1.rank) })
        let weights = tokenWeights.reserve(tokens)
        for (c, piece) in module.experts.enumerated() {
            var active = false
            for t in 0..<tokens {
                weights[t] = 0
                for j in 0..<routing.slots where routing.candidates[t * routing.slots + j] == Int32(c) {
                    weights[t] = routing.weights[t * routing.slots + j]
                    active = true
                }
            }
            guard active else { continue }
            Kernels.loraShrink(x, ldx: ldx, rows: nil, count: tokens, a: piece.a.pointer, aDType: piece.a.kernelDType,
                               rank: piece.rank, inWidth: module.inWidth, rowScale: weights, loraScale: piece.scale, into: h)
            Kernels.loraExpand(h, count: tokens, rank: piece.rank, bTransposed: piece.bTransposed.pointer,
                               bDType: piece.bTransposed.kernelDType, outWidth: module.outWidth, into: y, ldy: module.outWidth)
            for t in 0..<tokens { Kernels.add(y + t * module.outWidth, into: out + t * ldo, count: module.outWidth) }
        }
    }
}

@available(*, unavailable)
extension DenseExecutor: Sendable {}
