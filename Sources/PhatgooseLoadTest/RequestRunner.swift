import PhatgooseKernels
import PhatgooseProfiling
import PhatgooseRuntime
import Synchronization

/// Runs requests of a ``ModelWorkload`` on one client thread: its activation buffers are sized once for the largest
/// request, so a request allocates nothing.
///
/// # Thread safety
/// One per client thread; not shareable.
final class RequestRunner {
    let workload: ModelWorkload
    let target: any LoadTarget
    private let x: UnsafeMutablePointer<Float>
    private let y: UnsafeMutablePointer<Float>
    private let experts: UnsafeMutablePointer<Int32>
    private let weights: UnsafeMutablePointer<Float>
    private let capacity: Int
    private let routingCapacity: Int
    /// Routing decisions made while tallying was on.
    var tally: RoutingTally

    /// How a request ended.
    enum Outcome: Equatable {
        case completed
        /// Refused by admission control at some layer.
        case rejected
        /// Stopped between layers because the run ended.
        case aborted
        case failed(String)
    }

    init(workload: ModelWorkload, target: any LoadTarget) {
        self.workload = workload
        self.target = target
        let maxTokens = workload.options.maxTokens
        capacity = maxTokens * workload.widest
        routingCapacity = maxTokens * workload.maxSlots
        // Initialised (so touched) now: the client's memory is resident from the start, not grown by its first large
        // request, and the run's memory stays flat.
        x = .allocate(capacity: capacity)
        x.initialize(repeating: 0, count: capacity)
        y = .allocate(capacity: capacity)
        y.initialize(repeating: 0, count: capacity)
        experts = .allocate(capacity: routingCapacity)
        experts.initialize(repeating: -1, count: routingCapacity)
        weights = .allocate(capacity: routingCapacity)
        weights.initialize(repeating: 0, count: routingCapacity)
        tally = RoutingTally(layers: workload.layers.count, experts: workload.library.experts.count)
    }

    deinit {
        x.deallocate()
        y.deallocate()
        experts.deallocate()
        weights.deallocate()
    }

    /// Runs `request` through every layer. `tallying` says, per layer call, whether to count its routing;
    /// `abort` is checked between layers; `inRuntime` counts the calls inside the runtime (for the queue depth).
    func run(_ request: RequestSpec, tallying: () -> Bool, abort: () -> Bool, inRuntime: borrowing Atomic<Int>) -> Outcome {
        let tokens = request.tokens
        let layers = workload.layers
        let affinity = Float(workload.options.affinity)
        // x_0: noise rows plus the gate term, normalised.
        let first = layers[0]
        workload.noise.withUnsafeBufferPointer { noise in
            for t in 0..<tokens {
                let offset = (request.noiseOffset + 7919 * t) % workload.poolSize
                (y + t * first.inWidth).update(from: noise.baseAddress! + offset, count: first.inWidth)
            }
        }
        normalise(y, layer: first, expert: request.profileExpert, affinity: affinity, into: x, tokens: tokens)

        for l in layers.indices {
            if abort() { return .aborted }
            let layer = layers[l]
            y.update(repeating: 0, count: tokens * layer.outWidth)
            inRuntime.add(1, ordering: .relaxed)
            do {
                try target.apply(layer: layer.index, input: UnsafeBufferPointer(start: x, count: tokens * layer.inWidth), tokens: tokens,
                                  output: UnsafeMutableBufferPointer(start: y, count: tokens * layer.outWidth),
                                  experts: UnsafeMutableBufferPointer(start: experts, count: tokens * layer.slots),
                                  weights: UnsafeMutableBufferPointer(start: weights, count: tokens * layer.slots))
            } catch let error as RuntimeError {
                inRuntime.subtract(1, ordering: .relaxed)
                return error.code == .overloaded ? .rejected : .failed(error.message)
            } catch {
                inRuntime.subtract(1, ordering: .relaxed)
                return .failed(String(describing: error))
            }
            inRuntime.subtract(1, ordering: .relaxed)
            if tallying() { tally.add(layer: l, choices: experts, tokens: tokens, slots: layer.slots) }
            guard l + 1 < layers.count else { break }
            let next = layers[l + 1]
            // h = R(x, out) + d, in y.
            Self.resize(x, width: layer.inWidth, into: y, width: layer.outWidth, rows: tokens, accumulate: true)
            if layer.outWidth == next.inWidth {
                // x' = N(h + a * gate'), straight from y.
                normalise(y, layer: next, expert: request.profileExpert, affinity: affinity, into: x, tokens: tokens)
            } else {
                // x' = N(R(h, in') + a * gate'), resized into x and normalised in place.
                Self.resize(y, width: layer.outWidth, into: x, width: next.inWidth, rows: tokens, accumulate: false)
                normalise(x, layer: next, expert: request.profileExpert, affinity: affinity, into: x, tokens: tokens)
            }
        }
        return .completed
    }

    /// N: each row of `source` [tokens, in] plus a * sqrt(in) * the profile expert's normalised gate row (when it
    /// adapts the layer), scaled to unit root-mean-square, into `target` (which may be `source`). One pass computes
    /// the row and its sum of squares, one scales it; a row stays in L1 between the two.
    private func normalise(_ source: UnsafePointer<Float>, layer: ModelWorkload.Layer, expert: Int, affinity: Float,
                           into target: UnsafeMutablePointer<Float>, tokens: Int) {
        let width = layer.inWidth
        let row = expert < layer.candidateRow.count ? Int(layer.candidateRow[expert]) : -1
        let gate: UnsafePointer<Float>? = affinity != 0 && row >= 0 ? layer.gates + row * width : nil
        let c = affinity * layer.affinityScale * Float(width).squareRoot()
        let vectors = width / 8
        for t in 0..<tokens {
            let src = source + t * width, dst = target + t * width
            var sum = SIMD8<Float>()
            if let gate {
                for v in 0..<vectors {
                    let value = UnsafeRawPointer(src + 8 * v).loadUnaligned(as: SIMD8<Float>.self)
                        + c * UnsafeRawPointer(gate + 8 * v).loadUnaligned(as: SIMD8<Float>.self)
                    UnsafeMutableRawPointer(dst + 8 * v).storeBytes(of: value, as: SIMD8<Float>.self)
                    sum += value * value
                }
                for i in (8 * vectors)..<width { dst[i] = src[i] + c * gate[i] }
            } else {
                for v in 0..<vectors {
                    let value = UnsafeRawPointer(src + 8 * v).loadUnaligned(as: SIMD8<Float>.self)
                    UnsafeMutableRawPointer(dst + 8 * v).storeBytes(of: value, as: SIMD8<Float>.self)
                    sum += value * value
                }
                for i in (8 * vectors)..<width { dst[i] = src[i] }
            }
            var total = sum.sum()
            for i in (8 * vectors)..<width { total += dst[i] * dst[i] }
            let scale = 1 / (total / Float(width) + 1e-5).squareRoot()
            let s = SIMD8<Float>(repeating: scale)
            for v in 0..<vectors {
                let p = UnsafeMutableRawPointer(dst + 8 * v)
                p.storeBytes(of: p.loadUnaligned(as: SIMD8<Float>.self) * s, as: SIMD8<Float>.self)
            }
            for i in (8 * vectors)..<width { dst[i] *= scale }
        }
    }

    /// R: each of `rows` rows of `source` [rows, width] mapped to `targetWidth` into `target` [rows, targetWidth]
    /// (added when `accumulate`): tiled cyclically when wider, folded (sums of the elements congruent modulo the
    /// target width, times sqrt(target / width)) when narrower, copied when equal.
    static func resize(_ source: UnsafePointer<Float>, width: Int, into target: UnsafeMutablePointer<Float>, width targetWidth: Int,
                       rows: Int, accumulate: Bool) {
        for r in 0..<rows {
            let src = source + r * width, dst = target + r * targetWidth
            if targetWidth >= width {
                var j = 0
                while j < targetWidth {
                    let n = min(width, targetWidth - j)
                    if accumulate { Kernels.add(src, into: dst + j, count: n) } else { (dst + j).update(from: src, count: n) }
                    j += n
                }
            } else {
                let scale = Float((Double(targetWidth) / Double(width)).squareRoot())
                if !accumulate { dst.update(repeating: 0, count: targetWidth) }
                var i = 0
                while i < width {
                    let n = min(targetWidth, width - i)
                    for k in 0..<n { dst[k] += scale * src[i + k] }
                    i += n
                }
            }
        }
    }
}

@available(*, unavailable)
extension RequestRunner: Sendable {}
