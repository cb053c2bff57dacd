import Foundation
import PhatgooseFormats
import PhatgooseLibrary
import PhatgooseRouting
import PhatgooseRuntime
import Synchronization
import Testing

/// A library loaded from the standard fixture (3 experts, modules q [16 -> 16] and wo [24 -> 16]).
func standardLibrary(_ directory: TemporaryDirectory, experts: Int = 3, edit: (inout LibraryFixture) -> Void = { _ in }) throws -> ExpertLibrary {
    var fixture = LibraryFixture.standard(experts: experts)
    edit(&fixture)
    fixture.write(to: directory.path)
    return try ExpertLibrary.load(path: directory.path)
}

@Suite("routing and dispatch")
struct RoutingTests {
    @Test("PHATGOOSE scores are LN(x)·LN(g)/sqrt(d), softmax, top-k, renormalised with +1e-6")
    func phatgooseMath() throws {
        let directory = TemporaryDirectory()
        let library = try standardLibrary(directory)
        let module = library.module(named: wo)!
        let router = try LayerRouter(module: module, options: RoutingOptions(topK: 2))
        let x = randomFloats(5 * 24, seed: 21)
        var result = RoutingResult(tokenCount: 5, slots: 2)
        var scratch = [Float](repeating: 0, count: router.scratchCount(tokens: 5))
        router.route(x, ldx: 24, tokens: 5, scratch: &scratch, into: &result)
        func ln(_ v: [Double]) -> [Double] {
            let mean = v.reduce(0, +) / Double(v.count)
            let variance = v.reduce(0) { $0 + ($1 - mean) * ($1 - mean) } / Double(v.count)
            return v.map { ($0 - mean) / (variance + 1e-5).squareRoot() }
        }
        for t in 0..<5 {
            let xt = ln(x[(t * 24)..<((t + 1) * 24)].map(Double.init))
            let scores = module.experts.map { piece -> Double in
                let g = ln(piece.gate.floats().map(Double.init))
                return zip(xt, g).reduce(0) { $0 + $1.0 * $1.1 } / 24.0.squareRoot()
            }
            let maximum = scores.max()!
            let p = scores.map { exp($0 - maximum) }.map { $0 / scores.map { exp($0 - maximum) }.reduce(0, +) }
            let order = p.indices.sorted { p[$0] > p[$1] || (p[$0] == p[$1] && $0 < $1) }
            let chosen = Array(order.prefix(2))
            let denominator = chosen.reduce(0) { $0 + p[$1] } + 1e-6
            #expect(result.candidates[(t * 2)..<(t * 2 + 2)].map(Int.init) == chosen)
            for j in 0..<2 {
                #expect(abs(Double(result.weights[t * 2 + j]) - p[chosen[j]] / denominator) < 1e-5)
            }
        }
    }

    @Test("ties go to the lower expert index; k above the candidate count pads with -1 and weight 0")
    func tiesAndPadding() throws {
        let directory = TemporaryDirectory()
        // Experts 0 and 1 share a gate, so every token ties between them.
        let library = try standardLibrary(directory, experts: 3) { fixture in
            fixture.experts[1].gates = fixture.experts[0].gates
        }
        let module = library.module(named: q)!
        let x = randomFloats(8 * 16, seed: 22)
        var executor = LayerRouter?.none
        executor = try LayerRouter(module: module, options: RoutingOptions(topK: 5))
        let router = executor!
        var result = RoutingResult(tokenCount: 8, slots: 5)
        var scratch = [Float](repeating: 0, count: router.scratchCount(tokens: 8))
        router.route(x, ldx: 16, tokens: 8, scratch: &scratch, into: &result)
        for t in 0..<8 {
            let row = Array(result.candidates[(t * 5)..<(t * 5 + 5)])
            #expect(row[3] == -1 && row[4] == -1 && result.weights[t * 5 + 3] == 0 && result.weights[t * 5 + 4] == 0)
            let first0 = row.firstIndex(of: 0)!, first1 = row.firstIndex(of: 1)!
            #expect(first0 < first1, "tied experts: the lower index comes first, token \(t): \(row)")
            #expect(Set(row[0..<3]) == [0, 1, 2])
        }
    }

    @Test("uniform routing takes every candidate with weight 1/n; per-sequence routing gives a sequence one choice")
    func uniformAndSequence() throws {
        let directory = TemporaryDirectory()
        let library = try standardLibrary(directory, experts: 4)
        let module = library.module(named: q)!
        let x = randomFloats(10 * 16, seed: 23)
        let uniform = try LayerRouter(module: module, options: RoutingOptions(router: .uniform))
        var result = RoutingResult(tokenCount: 10, slots: 4)
        var scratch = [Float](repeating: 0, count: max(1, uniform.scratchCount(tokens: 10)))
        uniform.route(x, ldx: 16, tokens: 10, scratch: &scratch, into: &result)
        #expect(result.candidates == (0..<10).flatMap { _ in [0, 1, 2, 3] as [Int32] })
        #expect(result.weights.allSatisfy { $0 == 0.25 })

        let perSequence = try LayerRouter(module: module, options: RoutingOptions(topK: 2, granularity: .sequence(length: 4)))
        var sequenceResult = RoutingResult(tokenCount: 10, slots: 2)
        var sequenceScratch = [Float](repeating: 0, count: perSequence.scratchCount(tokens: 10))
        perSequence.route(x, ldx: 16, tokens: 10, scratch: &sequenceScratch, into: &sequenceResult)
        // Route the mean of each sequence per token and compare.
        let perToken = try LayerRouter(module: module, options: RoutingOptions(topK: 2))
        for (s, range) in [0..<4, 4..<8, 8..<10].enumerated() {
            var mean = [Float](repeating: 0, count: 16)
            // The mean as the router computes it: an F32 sum in token order, times 1/count.
            for c in 0..<16 { mean[c] = range.reduce(Float(0)) { $0 + x[$1 * 16 + c] } * (1 / Float(range.count)) }
            var single = RoutingResult(tokenCount: 1, slots: 2)
            var singleScratch = [Float](repeating: 0, count: perToken.scratchCount(tokens: 1))
            perToken.route(mean, ldx: 16, tokens: 1, scratch: &singleScratch, into: &single)
            for t in range {
                #expect(Array(sequenceResult.candidates[(t * 2)..<(t * 2 + 2)]) == single.candidates, "sequence \(s), token \(t)")
                #expect(Array(sequenceResult.weights[(t * 2)..<(t * 2 + 2)]) == single.weights)
            }
        }
    }

    @Test("a token whose row (or sequence) holds NaN or an infinity is unrouted: -1 and NaN in every slot, the others as without it",
          arguments: [RoutingOptions(topK: 2), RoutingOptions(router: .arrow, topK: 3), RoutingOptions(router: .uniform),
                      RoutingOptions(topK: 2, granularity: .sequence(length: 3))])
    func nonFiniteRowsAreUnrouted(_ options: RoutingOptions) throws {
        let directory = TemporaryDirectory()
        let library = try standardLibrary(directory, experts: 4)
        let module = library.module(named: q)!
        let router = try LayerRouter(module: module, options: options)
        let tokens = 9
        let x = randomFloats(tokens * 16, seed: 25)
        var bad = x
        bad[4 * 16 + 7] = .nan
        bad[8 * 16] = -.infinity
        var scratch = [Float](repeating: 0, count: max(1, router.scratchCount(tokens: tokens)))
        var clean = RoutingResult(tokenCount: tokens, slots: router.slots), result = clean
        router.route(x, ldx: 16, tokens: tokens, scratch: &scratch, into: &clean)
        router.route(bad, ldx: 16, tokens: tokens, scratch: &scratch, into: &result)
        // Per sequence of 3 (with a scoring router), a bad token takes its whole sequence with it.
        let unrouted: Set<Int> = if case .sequence = options.granularity, options.router != .uniform { [3, 4, 5, 6, 7, 8] } else { [4, 8] }
        let slots = router.slots
        for t in 0..<tokens {
            let candidates = Array(result.candidates[(t * slots)..<((t + 1) * slots)]), weights = Array(result.weights[(t * slots)..<((t + 1) * slots)])
            if unrouted.contains(t) {
                #expect(candidates.allSatisfy { $0 == -1 } && weights.allSatisfy { $0.isNaN }, "token \(t)")
            } else {
                #expect(candidates == Array(clean.candidates[(t * slots)..<((t + 1) * slots)]), "token \(t)")
                #expect(weights == Array(clean.weights[(t * slots)..<((t + 1) * slots)]), "token \(t)")
            }
        }
        let counted = result.candidates.withUnsafeBufferPointer { LayerRouter.unroutedTokens($0.baseAddress!, tokens: tokens, slots: slots) }
        #expect(counted.count == unrouted.count && counted.first == unrouted.min())
        // The executor adds nothing to an unrouted token's output row.
        var out = [Float](repeating: 2, count: tokens * module.outWidth)
        LayerExecutor().apply(module, router: router, x: bad, ldx: 16, tokens: tokens, out: &out, ldo: module.outWidth)
        for t in unrouted { #expect(out[(t * module.outWidth)..<((t + 1) * module.outWidth)].allSatisfy { $0 == 2 }, "token \(t)") }
        #expect(out.allSatisfy { $0.isFinite })
    }

    @Test("the dispatch plan groups assignments by expert, tokens ascending, and maps every slot back", arguments: [1, 7, 300])
    func dispatchPlan(_ tokens: Int) {
        var routing = RoutingResult(tokenCount: tokens, slots: 3)
        var state: UInt64 = UInt64(tokens)
        for t in 0..<tokens {
            var used = Set<Int32>()
            for j in 0..<3 {
                state = state &* 6_364_136_223_846_793_005 &+ 1
                var c = Int32((state >> 33) % 6)
                while used.contains(c) { c = (c + 1) % 6 }
                used.insert(c)
                // Every fifth token has a padded last slot.
                let padded = j == 2 && t % 5 == 0
                routing.candidates[t * 3 + j] = padded ? -1 : c
                routing.weights[t * 3 + j] = padded ? 0 : Float(j + 1) / 10
            }
        }
        var plan = DispatchPlan()
        plan.build(from: routing, candidates: 6)
        plan.checkInvariants(against: routing)
        #expect(plan.assignmentCount == routing.candidates.filter { $0 >= 0 }.count)
        var again = DispatchPlan()
        again.build(from: routing, candidates: 6)
        #expect(again.tokens == plan.tokens && again.offsets == plan.offsets && again.tokenSlots == plan.tokenSlots)
        for c in 0..<6 {
            for a in plan.range(of: c) {
                #expect(routing.candidates[Int(plan.tokens[a]) * 3 ..< Int(plan.tokens[a]) * 3 + 3].contains(Int32(c)))
            }
        }
    }

    @Test("the grouped executor gives the same bits as the naive per-token loop", arguments: [RouterKind.phatgoose, .arrow, .uniform])
    func groupedMatchesNaive(_ kind: RouterKind) throws {
        let directory = TemporaryDirectory()
        let library = try standardLibrary(directory, experts: 5)
        for module in library.modules {
            let router = try LayerRouter(module: module, options: RoutingOptions(router: kind, topK: 2))
            let tokens = 33
            let x = randomFloats(tokens * module.inWidth, seed: 24)
            var grouped = [Float](repeating: 0, count: tokens * module.outWidth)
            var naive = grouped
            LayerExecutor().apply(module, router: router, x: x, ldx: module.inWidth, tokens: tokens, out: &grouped, ldo: module.outWidth)
            NaiveExecutor().apply(module, router: router, x: x, ldx: module.inWidth, tokens: tokens, out: &naive, ldo: module.outWidth)
            #expect(grouped == naive, "\(kind) at \(module.name)")
            #expect(grouped.contains { $0 != 0 })
        }
    }

    @Test("Arrow prototypes are the top right-singular vectors of B·A")
    func arrowPrototypes() throws {
        let directory = TemporaryDirectory()
        let library = try standardLibrary(directory, experts: 2)
        let module = library.module(named: wo)!
        let prototypes = ArrowPrototypes.compute(module)
        for (c, piece) in module.experts.enumerated() {
            // Power iteration on (BA)ᵀ(BA), independent of the implementation's QR + Jacobi route.
            let a = piece.a.floats().map(Double.init), bt = piece.bTransposed.floats().map(Double.init)
            let r = piece.rank, n = module.inWidth, m = module.outWidth
            var v = [Double](repeating: 1, count: n)
            for _ in 0..<500 {
                let h = (0..<r).map { j in (0..<n).reduce(0.0) { $0 + a[j * n + $1] * v[$1] } }
                let y = (0..<m).map { o in (0..<r).reduce(0.0) { $0 + bt[$1 * m + o] * h[$1] } }
                let z = (0..<r).map { j in (0..<m).reduce(0.0) { $0 + bt[j * m + $1] * y[$1] } }
                v = (0..<n).map { i in (0..<r).reduce(0.0) { $0 + a[$1 * n + i] * z[$1] } }
                let norm = v.reduce(0) { $0 + $1 * $1 }.squareRoot()
                v = v.map { $0 / norm }
            }
            let e = prototypes[(c * n)..<((c + 1) * n)].map(Double.init)
            let cosine = abs(zip(e, v).reduce(0) { $0 + $1.0 * $1.1 })
            #expect(abs(cosine - 1) < 1e-4, "expert \(c): |cos| = \(cosine)")
        }
    }
}
