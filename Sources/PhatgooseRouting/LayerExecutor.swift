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
/// Route -> dispatch plan -> for each chosen expert, once per batch: gather its tokens, shrink (x A^T, rows scaled
/// by w * scale), expand (h B^T) into that expert's rows of a per-assignment buffer -> combine: each token adds its
/// rows in slot order. The multithreaded runtime runs the same steps and must match this executor bit for bit.
///
/// # Thread safety
/// Owns its scratch: one executor per thread.
public final class LayerExecutor {
    /// The dispatch plan of the last call of ``apply(_:router:x:ldx:tokens:out:ldo:)``.
    public private(set) var plan = DispatchPlan()
    /// Each token's choices in the last call of ``apply(_:router:x:ldx:tokens:out:ldo:)``.
    public private(set) var routing = RoutingResult(tokenCount: 0, slots: 0)
    private let routeScratch = ScratchBuffer()
    private let assignmentRows = ScratchBuffer()
    private let shrunk = ScratchBuffer()

    /// Creates an executor with empty scratch.
    public init() {}

    /// Routes and applies `module` to `tokens` rows of `x`, adding the mixture delta into `out`. Afterwards
    /// ``routing`` holds each token's choices.
    public func apply(_ module: RoutedModule, router: LayerRouter, x: UnsafePointer<Float>, ldx: Int, tokens: Int,
                      out: UnsafeMutablePointer<Float>, ldo: Int) {
        precondition(router.inWidth == module.inWidth && router.candidateCount == module.experts.count, "router built for another module")
        precondition(ldx >= module.inWidth && ldo >= module.outWidth, "leading dimensions too small")
        routing.route(router, x: x, ldx: ldx, tokens: tokens, scratch: routeScratch)
        plan.build(from: routing, candidates: module.experts.count)
        let outWidth = module.outWidth
        let rows = assignmentRows.reserve(plan.assignmentCount * outWidth)
        let maxRank = module.experts.reduce(0) { max($0, $1.rank) }
        let h = shrunk.reserve(plan.assignmentCount * maxRank)
        plan.tokens.withUnsafeBufferPointer { tokenList in
            plan.weights.withUnsafeBufferPointer { weightList in
                for (c, piece) in module.experts.enumerated() {
                    let range = plan.range(of: c)
                    guard !range.isEmpty else { continue }
                    Self.runExpert(piece, x: x, ldx: ldx, inWidth: module.inWidth, outWidth: outWidth,
                                   tokens: tokenList.baseAddress! + range.lowerBound, weights: weightList.baseAddress! + range.lowerBound,
                                   count: range.count, h: h, rows: rows + range.lowerBound * outWidth)
                }
            }
        }
        Self.combine(plan, rows: rows, outWidth: outWidth, tokenRange: 0..<tokens, out: out, ldo: ldo)
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

    /// Each token in `tokenRange` adds its assignment rows into `out`, in slot order.
    public static func combine(_ plan: DispatchPlan, rows: UnsafePointer<Float>, outWidth: Int, tokenRange: Range<Int>,
                               out: UnsafeMutablePointer<Float>, ldo: Int) {
        // Up to 8 rows per pass over the token's output row (one read and write of it per pass, not per row).
        withUnsafeTemporaryAllocation(of: UnsafePointer<Float>?.self, capacity: 8) { pending in
            plan.tokenSlots.withUnsafeBufferPointer { slots in
                for t in tokenRange {
                    var n = 0
                    for j in 0..<plan.slots {
                        let a = Int(slots[t * plan.slots + j])
                        guard a >= 0 else { continue }
                        pending[n] = UnsafePointer(rows + a * outWidth)
                        n += 1
                        if n == 8 {
                            Kernels.addRows(pending.baseAddress!, rowCount: n, into: out + t * ldo, width: outWidth)
                            n = 0
                        }
                    }
                    if n > 0 { Kernels.addRows(pending.baseAddress!, rowCount: n, into: out + t * ldo, width: outWidth) }
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

/// The baseline that grouping is measured against: for each token, for each of its experts, a one-row shrink and
/// expand, added straight into the output. Same routing, same kernels.
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
        for t in 0..<tokens {
            var token = Int32(t)
            for j in 0..<routing.slots {
                let c = Int(routing.candidates[t * routing.slots + j])
                guard c >= 0 else { continue }
                var weight = routing.weights[t * routing.slots + j]
                LayerExecutor.runExpert(module.experts[c], x: x, ldx: ldx, inWidth: module.inWidth, outWidth: module.outWidth,
                                        tokens: &token, weights: &weight, count: 1, h: h, rows: y)
                Kernels.add(y, into: out + t * ldo, count: module.outWidth)
            }
        }
    }
}

@available(*, unavailable)
extension NaiveExecutor: Sendable {}
