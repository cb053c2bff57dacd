import ArgumentParser
import PhatgooseDistributed
import PhatgooseFormats
import PhatgooseLibrary
import PhatgooseRouting

/// Routing options shared by the commands that route.
struct RoutingFlags: ParsableArguments {
    @Option(parsing: .unconditional, help: "Experts per token (default: the library's top_k).")
    var topK: Int?

    @Option(help: "Router: phatgoose, arrow or uniform (default: the library's router).")
    var router: String?

    @Option(help: "Route per token or per sequence (the mean activation of a sequence routes all its tokens).")
    var granularity: String = "token"

    @Option(parsing: .unconditional, help: "Tokens per sequence with --granularity sequence (default: the whole batch is one sequence).")
    var sequenceLength: Int?

    @Option(parsing: .unconditional, help: "Arrow: temperature dividing |x . prototype|.")
    var arrowTemperature: Float = 10

    @Flag(help: "Arrow: also scale scores by 1/sqrt(in).")
    var arrowScaled = false

    func validate() throws {
        if let topK, topK < 1 { throw ValidationError("--top-k: expected an integer >= 1, found \(topK)") }
        if let router, RouterKind(rawValue: router) == nil {
            throw ValidationError("--router: expected one of \(RouterKind.allCases.map(\.rawValue).joined(separator: ", ")), found \(router)")
        }
        guard granularity == "token" || granularity == "sequence" else {
            throw ValidationError("--granularity: expected token or sequence, found \(granularity)")
        }
        if let sequenceLength, sequenceLength < 1 { throw ValidationError("--sequence-length: expected an integer >= 1, found \(sequenceLength)") }
        if sequenceLength != nil && granularity != "sequence" { throw ValidationError("--sequence-length: only with --granularity sequence") }
        guard arrowTemperature.isFinite, arrowTemperature > 0 else { throw ValidationError("--arrow-temperature: expected a positive number, found \(arrowTemperature)") }
    }

    /// The library's defaults with these flags applied. `tokens` sizes a whole-batch sequence.
    func options(defaults: RoutingDefaults, tokens: Int) -> RoutingOptions {
        var options = RoutingOptions(defaults: defaults)
        if let topK { options.topK = topK }
        if let router { options.router = RouterKind(rawValue: router)! }
        if granularity == "sequence" { options.granularity = .sequence(length: sequenceLength ?? Int.max / 2) }
        options.arrowTemperature = arrowTemperature
        options.arrowScaled = arrowScaled
        return options
    }
}

struct Apply: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Route and apply every module of an input file: mixture deltas, chosen experts and weights.",
        discussion: """
            Input: one tensor per module, keyed by module name, shape [T, in]. Output, per input key: <module> the \
            mixture delta [T, out] F32 (without W x), <module>.experts [T, k] I32, <module>.weights [T, k] F32. \
            The output is written atomically: on any error or interruption (SIGINT, SIGTERM) no file is left \
            behind, and an output that is (or resolves to) the input or a file of the library is refused.
            """
    )

    @Option(help: "A library directory or packed library.")
    var library: String

    @Option(help: "Activations: a .safetensors file with one [T, in] tensor per module.")
    var input: String

    @Option(help: "The .safetensors file to write.")
    var output: String

    @OptionGroup var routing: RoutingFlags

    @Option(help: "Output format for the summary of what was written: text or json.")
    var format: OutputFormat = .text

    @Option(parsing: .unconditional, help: "Most bytes of expert weights (lora_A and lora_B) one process may hold; with --mpi, per rank.")
    var memoryCap: Int?

    @OptionGroup var distributed: DistributedFlags

    func validate() throws {
        if let memoryCap, memoryCap < 0 { throw ValidationError("--memory-cap: expected at least 0, found \(memoryCap)") }
    }

    func run() throws {
        guard distributed.mpi else {
            try OutputPath.refuseOverwriting(output, option: "--output", inputs: [input, library])
            let loaded = try ExpertLibrary.load(path: library)
            if let memoryCap {
                let held = loaded.modules.reduce(0) { $0 + $1.experts.reduce(0) { $0 + $1.a.byteCount + $1.bTransposed.byteCount } }
                guard held <= memoryCap else {
                    throw DistributedError(.memoryCap, "\(library): memory cap: expected at most \(memoryCap) bytes of expert weights, found \(held) in its \(loaded.experts.count) experts (shard them over MPI ranks with --mpi)")
                }
            }
            let file = try SafetensorsFile(path: input)
            let writer = try ApplyFile.apply(loaded, input: file, options: routing.options(defaults: loaded.routing, tokens: 0))
            try writer.write(to: output)
            report(file)
            return
        }
        guard let world = try serveUnlessHost(library: library, memoryCap: memoryCap) else { return }
        try hostingMPI(world) {
            try OutputPath.refuseOverwriting(output, option: "--output", inputs: [input, library])
            let loaded = try ExpertLibrary.load(path: library)
            let file = try SafetensorsFile(path: input)
            let runtime = try DistributedRuntime(library: loaded, world: world, options: distributed.options(
                routing: routing.options(defaults: loaded.routing, tokens: 0), memoryCap: memoryCap, experts: loaded.experts.count))
            let writer = try ApplyFile.apply(loaded, input: file, slots: { runtime.slots(ofModule: $0) }, run: { m, x, tokens, out, experts, weights in
                try runtime.apply(module: m, input: x, tokens: tokens, output: out, experts: experts, weights: weights)
            })
            try writer.write(to: output)
            report(file)
            return ((), runtime)
        }
    }

    private func report(_ file: SafetensorsFile) {
        let tokens = file.tensors.map { $0.shape[0] }
        switch format {
        case .json:
            print(JSONValue.object([
                ("output", .string(output)), ("modules", .integer(file.tensors.count)),
                ("tokens", .array(file.tensors.map { .object([("module", .string($0.name)), ("tokens", .integer($0.shape[0]))]) })),
                ("tensors", .integer(3 * file.tensors.count)),
            ]).serialized())
        case .text:
            let counts = Set(tokens).count == 1 ? "\(tokens.first ?? 0) tokens" : "\(tokens.reduce(0, +)) tokens in all"
            print("wrote deltas, experts and weights of \(file.tensors.count) modules x \(counts) to \(output)")
        }
    }
}
