import PhatgooseKernels
import PhatgooseLibrary

/// A growable F32 scratch buffer, reused across calls so steady-state calls allocate nothing.
///
/// The storage starts on a 64-byte boundary: a row of a multiple of 16 floats then never splits a cache line in the
/// kernels' 64-byte (AVX-512) loads, which measured 1.5x faster on the score GEMM than malloc's 16-byte alignment.
///
/// Not thread-safe: owned by one executor.
public final class ScratchBuffer {
    /// The storage; replaced (and the old one freed) when ``reserve(_:)`` grows it.
    public private(set) var pointer: UnsafeMutablePointer<Float>
    /// Floats the storage holds.
    public private(set) var capacity: Int

    /// Allocates storage for `capacity` floats (at least 16).
    public init(capacity: Int = 0) {
        self.capacity = max(capacity, 16)
        pointer = Self.allocateAligned(Float.self, capacity: self.capacity)
    }

    /// Makes room for `count` floats (contents are not kept).
    @discardableResult
    public func reserve(_ count: Int) -> UnsafeMutablePointer<Float> {
        if count > capacity {
            UnsafeMutableRawPointer(pointer).deallocate()
            capacity = count
            pointer = Self.allocateAligned(Float.self, capacity: count)
        }
        return pointer
    }

    /// Uninitialised storage for `capacity` values of a trivial type, on a 64-byte boundary; free it with
    /// `UnsafeMutableRawPointer(pointer).deallocate()`.
    public static func allocateAligned<T>(_: T.Type, capacity: Int) -> UnsafeMutablePointer<T> {
        UnsafeMutableRawPointer.allocate(byteCount: max(capacity, 1) * MemoryLayout<T>.stride,
                                         alignment: max(64, MemoryLayout<T>.alignment))
            .bindMemory(to: T.self, capacity: capacity)
    }

    deinit { UnsafeMutableRawPointer(pointer).deallocate() }
}

@available(*, unavailable)
extension ScratchBuffer: Sendable {}

extension RoutingResult {
    /// Resizes this result for `tokens` tokens of `router` (reusing its storage when the size is unchanged) and
    /// routes `x` into it, with `scratch` grown as needed: the routing step every executor shares.
    public mutating func route(_ router: LayerRouter, x: UnsafePointer<Float>, ldx: Int, tokens: Int, scratch: ScratchBuffer) {
        if tokenCount != tokens || slots != router.slots {
            self = RoutingResult(tokenCount: tokens, slots: router.slots)
        }
        router.route(x, ldx: ldx, tokens: tokens, scratch: scratch.reserve(router.scratchCount(tokens: tokens)), into: &self)
    }
}

/// Applies one routed layer to a batch on the calling thread:
/// `out[t] += sum over chosen e of w * scale_e * B_e (A_e x_t)`.
///
/// Route -> dispatch plan -> for each chosen expert in index order, once per batch: gather its tokens, shrink
/// (x A^T, rows scaled by w * scale), expand (h B^T) added straight into those tokens' output rows. So each token's
/// output receives its experts' rows in ascending expert order, one rounding per add. The multithreaded runtime
/// expands into a per-assignment buffer instead (experts run concurrently) and its combine adds each token's rows in
/// the same ascending expert order, so it matches this executor bit for bit.
///
/// # Thread safety
/// Owns its scratch: one executor per thread.
public final class LayerExecutor {
    /// The dispatch plan of the last call of ``apply(_:router:x:ldx:tokens:out:ldo:)``.
    public private(set) var plan = DispatchPlan()
    /// Each token's choices in the last call of ``apply(_:router:x:ldx:tokens:out:ldo:)``.
    public private(set) var routing = RoutingResult(tokenCount: 0, slots: 0)
    private let routeScratch = ScratchBuffer()
    private let shrunk = ScratchBuffer()

    /// Creates an executor with empty scratch.
    public init() {}

    /// Routes and applies `module` to `tokens` rows of `x`, adding the mixture delta into `out` (which must not
    /// overlap `x`: the experts read `x` while adding into `out`). Afterwards ``routing`` holds each token's choices.
    public func apply(_ module: RoutedModule, router: LayerRouter, x: UnsafePointer<Float>, ldx: Int, tokens: Int,
                      out: UnsafeMutablePointer<Float>, ldo: Int) {
        precondition(router.inWidth == module.inWidth && router.candidateCount == module.experts.count, "router built for another module")
        precondition(ldx >= module.inWidth && ldo >= module.outWidth, "leading dimensions too small")
        routing.route(router, x: x, ldx: ldx, tokens: tokens, scratch: routeScratch)
        plan.build(from: routing, candidates: module.experts.count)
        let outWidth = module.outWidth
        let maxRank = module.experts.reduce(0) { max($0, $1.rank) }
        let h = shrunk.reserve(plan.assignmentCount * maxRank)
        plan.tokens.withUnsafeBufferPointer { tokenList in
            plan.weights.withUnsafeBufferPointer { weightList in
                for (c, piece) in module.experts.enumerated() {
                    let range = plan.range(of: c)
                    guard !range.isEmpty else { continue }
                    Self.runExpertAdding(ExpertKernelView(piece), x: x, ldx: ldx, inWidth: module.inWidth, outWidth: outWidth,
                                         tokens: tokenList.baseAddress! + range.lowerBound,
                                         weights: weightList.baseAddress! + range.lowerBound, count: range.count, h: h,
                                         out: out, ldo: ldo)
                }
            }
        }
    }

    /// Shrink and expand for `count` gathered tokens of one expert: rows[i] = w_i * scale * B (A x_{tokens[i]}).
    @inlinable
    public static func runExpert(_ piece: ModuleExpert, x: UnsafePointer<Float>, ldx: Int, inWidth: Int, outWidth: Int,
                                 tokens: UnsafePointer<Int32>, weights: UnsafePointer<Float>, count: Int,
                                 h: UnsafeMutablePointer<Float>, rows: UnsafeMutablePointer<Float>) {
        runExpert(ExpertKernelView(piece), x: x, ldx: ldx, inWidth: inWidth, outWidth: outWidth, tokens: tokens, weights: weights,
                  count: count, h: h, rows: rows)
    }

    /// The same through a ``ExpertKernelView``, which copies without reference counting (the runtime's hot path).
    @inlinable
    public static func runExpert(_ piece: ExpertKernelView, x: UnsafePointer<Float>, ldx: Int, inWidth: Int, outWidth: Int,
                                 tokens: UnsafePointer<Int32>, weights: UnsafePointer<Float>, count: Int,
                                 h: UnsafeMutablePointer<Float>, rows: UnsafeMutablePointer<Float>) {
        Kernels.loraShrink(x, ldx: ldx, rows: tokens, count: count, a: piece.a, aDType: piece.aDType,
                           rank: piece.rank, inWidth: inWidth, rowScale: weights, loraScale: piece.scale, into: h)
        Kernels.loraExpand(h, count: count, rank: piece.rank, bTransposed: piece.bTransposed,
                           bDType: piece.bDType, outWidth: outWidth, into: rows, ldy: outWidth)
    }

    /// Shrink and expand for `count` gathered tokens of one expert, added into their output rows:
    /// out[tokens[i]] += w_i * scale * B (A x_{tokens[i]}), with the bits of ``runExpert(_:x:ldx:inWidth:outWidth:tokens:weights:count:h:rows:)``
    /// followed by one add per row. The tokens must be distinct (a plan's tokens of one expert are).
    @inlinable
    public static func runExpertAdding(_ piece: ExpertKernelView, x: UnsafePointer<Float>, ldx: Int, inWidth: Int, outWidth: Int,
                                       tokens: UnsafePointer<Int32>, weights: UnsafePointer<Float>, count: Int,
                                       h: UnsafeMutablePointer<Float>, out: UnsafeMutablePointer<Float>, ldo: Int) {
        Kernels.loraShrink(x, ldx: ldx, rows: tokens, count: count, a: piece.a, aDType: piece.aDType,
                           rank: piece.rank, inWidth: inWidth, rowScale: weights, loraScale: piece.scale, into: h)
        Kernels.loraExpandAdd(h, count: count, rank: piece.rank, bTransposed: piece.bTransposed, bDType: piece.bDType,
                              outWidth: outWidth, into: out, ldy: ldo, rows: tokens)
    }

    /// Each token in `tokenRange` adds its assignment rows into `out`, in ascending assignment order, which is
    /// ascending expert order (the plan sorts assignments by expert): the order in which ``apply(_:router:x:ldx:tokens:out:ldo:)``
    /// adds them.
    /// `out` holds the row of token `firstToken` first (a part of the plan's tokens that has its own output).
    public static func combine(_ plan: DispatchPlan, rows: UnsafePointer<Float>, outWidth: Int, tokenRange: Range<Int>,
                               out: UnsafeMutablePointer<Float>, ldo: Int, firstToken: Int = 0) {
        // Up to 8 rows per pass over the token's output row (one read and write of it per pass, not per row).
        withUnsafeTemporaryAllocation(of: UnsafePointer<Float>?.self, capacity: 8) { pending in
            plan.tokenSlots.withUnsafeBufferPointer { slots in
                // The token's assignments, ascending (insertion sort: a token has a few), then added 8 at a time.
                withUnsafeTemporaryAllocation(of: Int32.self, capacity: max(plan.slots, 1)) { order in
                    for t in tokenRange {
                        var count = 0
                        for j in 0..<plan.slots {
                            let a = slots[t * plan.slots + j]
                            guard a >= 0 else { continue }
                            var i = count
                            while i > 0 && order[i - 1] > a {
                                order[i] = order[i - 1]
                                i -= 1
                            }
                            order[i] = a
                            count += 1
                        }
                        var n = 0
                        for i in 0..<count {
                            pending[n] = UnsafePointer(rows + Int(order[i]) * outWidth)
                            n += 1
                            if n == 8 || i == count - 1 {
                                Kernels.addRows(pending.baseAddress!, rowCount: n, into: out + (t - firstToken) * ldo, width: outWidth)
                                n = 0
                            }
                        }
                    }
                }
            }
        }
    }
}

@available(*, unavailable)
extension LayerExecutor: Sendable {}

/// What the LoRA kernels need of one ``ModuleExpert``, as plain values: copying it touches no reference count, so
/// loops over work items can read it from a table without retain/release traffic (which measured about 10% of a
/// decode call when the items copied `ModuleExpert`s).
///
/// # Thread safety
/// `@unchecked Sendable` because of the raw pointers: they point into weights that the ``ModuleExpert`` it was
/// made from keeps alive and that no one writes; whoever holds a view must keep that owner alive.
public struct ExpertKernelView: @unchecked Sendable {
    /// The expert the weights belong to (its index in the library).
    public var expert: Int32
    /// `lora_A` [rank, in].
    public var a: UnsafeRawPointer
    /// The kernel dtype of `a` (a `pg_dtype` value).
    public var aDType: Int32
    /// `lora_B` transposed [rank, out].
    public var bTransposed: UnsafeRawPointer
    /// The kernel dtype of `bTransposed`.
    public var bDType: Int32
    /// The LoRA rank at this module.
    public var rank: Int
    /// The LoRA scale (alpha / r, or alpha / sqrt(r) with rsLoRA).
    public var scale: Float

    /// The view of `piece`'s weights (valid while `piece`'s tensors live).
    public init(_ piece: ModuleExpert) {
        expert = piece.expert.rawValue
        a = piece.a.pointer
        aDType = piece.a.kernelDType
        bTransposed = piece.bTransposed.pointer
        bDType = piece.bTransposed.kernelDType
        rank = piece.rank
        scale = piece.scale
    }
}

/// The baseline that grouping is measured against: for each token, for each of its experts (ascending), a one-row
/// shrink and expand, added straight into the output. Same routing, same kernels, same bits.
public final class NaiveExecutor {
    /// Each token's choices in the last call of `apply`.
    public private(set) var routing = RoutingResult(tokenCount: 0, slots: 0)
    private let routeScratch = ScratchBuffer()
    private let row = ScratchBuffer()
    private let shrunk = ScratchBuffer()

    /// Creates an executor with empty scratch.
    public init() {}

    /// Routes and applies `module` to `tokens` rows of `x`, adding the mixture delta into `out`, one token and
    /// one chosen expert at a time.
    public func apply(_ module: RoutedModule, router: LayerRouter, x: UnsafePointer<Float>, ldx: Int, tokens: Int,
                      out: UnsafeMutablePointer<Float>, ldo: Int) {
        routing.route(router, x: x, ldx: ldx, tokens: tokens, scratch: routeScratch)
        let y = row.reserve(module.outWidth)
        let h = shrunk.reserve(module.experts.reduce(0) { max($0, $1.rank) })
        let slots = routing.slots
        var order = [Int](repeating: 0, count: slots)
        for t in 0..<tokens {
            var token = Int32(t)
            // The token's slots by ascending expert (insertion sort), the order in which the grouped executors add.
            var count = 0
            for j in 0..<slots where routing.candidates[t * slots + j] >= 0 {
                var i = count
                while i > 0 && routing.candidates[t * slots + order[i - 1]] > routing.candidates[t * slots + j] {
                    order[i] = order[i - 1]
                    i -= 1
                }
                order[i] = j
                count += 1
            }
            for j in order.prefix(count) {
                let c = Int(routing.candidates[t * slots + j])
                var weight = routing.weights[t * slots + j]
                LayerExecutor.runExpert(module.experts[c], x: x, ldx: ldx, inWidth: module.inWidth, outWidth: module.outWidth,
                                        tokens: &token, weights: &weight, count: 1, h: h, rows: y)
                Kernels.add(y, into: out + t * ldo, count: module.outWidth)
            }
        }
    }
}

@available(*, unavailable)
extension NaiveExecutor: Sendable {}
