/// The T*k (token, expert, weight) assignments of one call, counting-sorted by expert so each expert's tokens are
/// contiguous and its LoRA runs once over all of them.
///
/// Assignment `a` (a row of the per-assignment output buffer) belongs to candidate `c` when
/// `offsets[c] <= a < offsets[c + 1]`; within a candidate, tokens ascend. `tokenSlots[t * slots + j]` is the
/// assignment of token t's j-th choice (-1 for a padded slot), so the combine finds each token's rows (and adds them
/// in ascending assignment order, which is ascending expert order).
/// Deterministic: the same routing always gives the same plan.
public struct DispatchPlan: Sendable {
    /// Tokens in the call the plan was built from.
    public private(set) var tokenCount = 0
    /// Slots per token in that call.
    public private(set) var slots = 0
    /// Candidates of the module the plan was built for.
    public private(set) var candidateCount = 0
    /// [candidates + 1] prefix sums of assignments per candidate.
    public private(set) var offsets: [Int32] = []
    /// [assignments] token of each assignment.
    public private(set) var tokens: [Int32] = []
    /// [assignments] mixture weight of each assignment.
    public private(set) var weights: [Float] = []
    /// [tokens * slots] assignment of each (token, slot), or -1.
    public private(set) var tokenSlots: [Int32] = []

    /// Creates an empty plan; ``build(from:candidates:)`` fills it.
    public init() {}

    /// Number of (token, expert) assignments.
    public var assignmentCount: Int { Int(offsets.last ?? 0) }

    /// The assignments of candidate `c`.
    public func range(of candidate: Int) -> Range<Int> { Int(offsets[candidate])..<Int(offsets[candidate + 1]) }

    /// Rebuilds the plan from `routing` for a module with `candidates` experts, reusing this plan's storage (no
    /// allocation once it has held a call of this size).
    public mutating func build(from routing: RoutingResult, candidates: Int) {
        routing.candidates.withUnsafeBufferPointer { chosen in
            routing.weights.withUnsafeBufferPointer { weights in
                build(tokens: routing.tokenCount, slots: routing.slots, chosen: chosen.baseAddress!, weights: weights.baseAddress!, candidates: candidates)
            }
        }
    }

    /// Rebuilds the plan from raw routing outputs of `tokens * slots` entries.
    public mutating func build(tokens tokenTotal: Int, slots slotCount: Int, chosen: UnsafePointer<Int32>,
                               weights chosenWeights: UnsafePointer<Float>, candidates: Int) {
        let routing = (tokenCount: tokenTotal, slots: slotCount, candidates: chosen, weights: chosenWeights)
        tokenCount = routing.tokenCount
        slots = routing.slots
        candidateCount = candidates
        let total = routing.tokenCount * routing.slots
        Self.resize(&offsets, to: candidates + 1, fill: 0)
        Self.resize(&tokenSlots, to: total, fill: -1)
        for i in 0..<offsets.count { offsets[i] = 0 }
        // Count, then prefix-sum (offsets[c + 1] holds the count of c until the sum).
        for a in 0..<total {
            let c = routing.candidates[a]
            if c >= 0 { offsets[Int(c) + 1] += 1 }
        }
        for c in 0..<candidates { offsets[c + 1] += offsets[c] }
        let assigned = Int(offsets[candidates])
        Self.resize(&tokens, to: assigned, fill: 0)
        Self.resize(&weights, to: assigned, fill: 0)
        // Scatter in token order, so tokens ascend within each candidate. offsets[c] is used as the cursor and
        // restored afterwards.
        for t in 0..<routing.tokenCount {
            for j in 0..<routing.slots {
                let c = Int(routing.candidates[t * routing.slots + j])
                guard c >= 0 else {
                    tokenSlots[t * routing.slots + j] = -1
                    continue
                }
                let a = Int(offsets[c])
                offsets[c] += 1
                tokens[a] = Int32(t)
                weights[a] = routing.weights[t * routing.slots + j]
                tokenSlots[t * routing.slots + j] = Int32(a)
            }
        }
        for c in stride(from: candidates, to: 0, by: -1) { offsets[c] = offsets[c - 1] }
        offsets[0] = 0
        #if PHATGOOSE_CHECK_INVARIANTS
        var copy = RoutingResult(tokenCount: tokenTotal, slots: slotCount)
        for i in 0..<(tokenTotal * slotCount) {
            copy.candidates[i] = chosen[i]
            copy.weights[i] = chosenWeights[i]
        }
        checkInvariants(against: copy)
        #endif
    }

    private static func resize<T>(_ array: inout [T], to count: Int, fill: T) {
        if array.count > count {
            array.removeLast(array.count - count)
        } else if array.count < count {
            array.append(contentsOf: repeatElement(fill, count: count - array.count))
        }
    }

    /// O(T*k) consistency checks, compiled in under PHATGOOSE_CHECK_INVARIANTS (debug builds and the tests).
    public func checkInvariants(against routing: RoutingResult) {
        precondition(offsets.count == candidateCount + 1 && offsets[0] == 0, "plan: offsets must start at 0")
        for c in 0..<candidateCount {
            precondition(offsets[c] <= offsets[c + 1], "plan: offsets must not decrease")
            let r = range(of: c)
            for a in r.dropFirst() { precondition(tokens[a - 1] < tokens[a], "plan: tokens of candidate \(c) must ascend without repeats") }
        }
        precondition(assignmentCount == tokens.count, "plan: every assignment has a token")
        var seen = [Bool](repeating: false, count: assignmentCount)
        for t in 0..<tokenCount {
            for j in 0..<slots {
                let a = Int(tokenSlots[t * slots + j])
                let c = Int(routing.candidates[t * slots + j])
                if c < 0 { precondition(a == -1, "plan: a padded slot has no assignment"); continue }
                precondition(range(of: c).contains(a), "plan: slot (\(t), \(j)) must point into candidate \(c)'s assignments")
                precondition(Int(tokens[a]) == t && weights[a] == routing.weights[t * slots + j], "plan: assignment \(a) must carry its token and weight")
                precondition(!seen[a], "plan: assignment \(a) is used twice")
                seen[a] = true
            }
        }
        precondition(seen.allSatisfy { $0 }, "plan: every assignment belongs to a slot")
    }
}
