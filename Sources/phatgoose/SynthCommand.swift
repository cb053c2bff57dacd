import ArgumentParser
import PhatgooseFormats
import PhatgooseLibrary
import PhatgooseSynth

struct SynthCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "synth",
        abstract: "Write a synthetic expert library in the PEFT layout, and optionally matching activations.",
        discussion: """
            Experts cluster around tasks; tokens of one sequence come from one task; --popularity skews how often \
            tasks occur. The same options always produce the same files.
            """
    )

    @Option(help: "Directory to write the library into (created if needed).")
    var out: String

    @Option(help: "Model shape preset: \(ModelShape.presets.keys.sorted().joined(separator: ", ")).")
    var shape: String = "tiny"

    @Option(name: .customLong("layer"), help: "An explicit layer NAME:IN:OUT (repeatable; replaces --shape).")
    var layers: [String] = []

    @Option(parsing: .unconditional, help: "Number of experts.")
    var experts: Int = 8

    @Option(parsing: .unconditional, help: "LoRA rank r.")
    var rank: Int = 16

    @Option(parsing: .unconditional, help: "LoRA alpha (scale = alpha / r).")
    var alpha: Double = 1

    @Flag(help: "Use rsLoRA scaling (alpha / sqrt(r)).")
    var rslora = false

    @Option(help: "Weight dtype: f32, f16 or bf16.")
    var dtype: String = "bf16"

    @Option(help: "Gate dtype: f32, f16 or bf16.")
    var gateDtype: String = "f32"

    @Option(parsing: .unconditional, help: "Random seed.")
    var seed: UInt64 = 0

    @Option(parsing: .unconditional, help: "Number of tasks the experts cluster around (default: experts / 4, at least 1).")
    var tasks: Int?

    @Option(parsing: .unconditional, help: "Zipf exponent of task popularity (0 = uniform).")
    var popularity: Double = 1

    @Option(parsing: .unconditional, help: "Fraction of layers each expert adapts (expert 0 adapts all).")
    var coverage: Double = 1

    @Option(parsing: .unconditional, help: "Default top-k written to library.json.")
    var topK: Int = 2

    @Flag(help: "Do not write library.json (experts are then found by the directory-scan rule).")
    var noManifest = false

    @Option(help: "Also write token activations for every layer to this .safetensors file.")
    var activations: String?

    @Option(parsing: .unconditional, help: "Tokens in the activations file.")
    var tokens: Int = 64

    @Option(parsing: .unconditional, help: "Tokens per sequence in the activations (each sequence is one task).")
    var sequenceLength: Int = 16

    @Option(help: "Output format for the summary: text or json.")
    var format: OutputFormat = .text

    func validate() throws {
        guard DType(userSpelling: dtype)?.isComputeFloat == true else { throw ValidationError("--dtype: expected f32, f16 or bf16, found \(dtype)") }
        guard DType(userSpelling: gateDtype)?.isComputeFloat == true else { throw ValidationError("--gate-dtype: expected f32, f16 or bf16, found \(gateDtype)") }
        if layers.isEmpty && ModelShape.presets[shape] == nil {
            throw ValidationError("--shape: expected one of \(ModelShape.presets.keys.sorted().joined(separator: ", ")), found \(shape)")
        }
        guard tokens >= 1 else { throw ValidationError("--tokens: expected at least 1, found \(tokens)") }
        guard experts >= 1 else { throw ValidationError("--experts: expected at least 1, found \(experts)") }
        guard rank >= 1 else { throw ValidationError("--rank: expected at least 1, found \(rank)") }
        guard alpha.isFinite else { throw ValidationError("--alpha: expected a finite number, found \(alpha)") }
        if let tasks, tasks < 1 { throw ValidationError("--tasks: expected at least 1, found \(tasks)") }
        guard coverage > 0, coverage <= 1 else { throw ValidationError("--coverage: expected a fraction in (0, 1], found \(coverage)") }
        guard popularity >= 0, popularity.isFinite else { throw ValidationError("--popularity: expected a number >= 0, found \(popularity)") }
        guard topK >= 1 else { throw ValidationError("--top-k: expected at least 1, found \(topK)") }
        guard sequenceLength >= 1 else { throw ValidationError("--sequence-length: expected at least 1, found \(sequenceLength)") }
        _ = try parsedLayers()
    }

    func parsedLayers() throws -> ModelShape {
        guard !layers.isEmpty else { return ModelShape.presets[shape]! }
        return ModelShape(name: "custom", layers: try layers.map { spec in
            let parts = spec.split(separator: ":")
            guard parts.count == 3, let inWidth = Int(parts[1]), let outWidth = Int(parts[2]), inWidth > 0, outWidth > 0 else {
                throw ValidationError("--layer: expected NAME:IN:OUT with positive widths, found \(spec)")
            }
            return ModelShape.Layer(name: String(parts[0]), inWidth: inWidth, outWidth: outWidth)
        })
    }

    func run() throws {
        let options = SynthOptions(
            shape: try parsedLayers(), experts: experts, rank: rank, alpha: alpha, useRSLoRA: rslora,
            weightDType: DType(userSpelling: dtype)!, gateDType: DType(userSpelling: gateDtype)!, seed: seed, tasks: tasks,
            popularity: popularity, coverage: coverage, manifest: !noManifest, topK: topK)
        try Synth.writeLibrary(options, to: out)
        if let activations {
            try Synth.writeActivations(options, tokens: tokens, sequenceLength: sequenceLength, seed: seed, to: activations)
        }
        let summary = JSONValue.object([
            ("library", .string(out)),
            ("shape", .string(options.shape.name)),
            ("layers", .integer(options.shape.layers.count)),
            ("experts", .integer(options.experts)),
            ("tasks", .integer(options.tasks)),
            ("rank", .integer(options.rank)),
            ("dtype", .string(options.weightDType.rawValue)),
            ("activations", activations.map { .string($0) } ?? .null),
            ("tokens", activations == nil ? .null : .integer(tokens)),
        ])
        switch format {
        case .json: print(summary.serialized())
        case .text:
            print("wrote \(options.experts) experts x \(options.shape.layers.count) layers (\(options.shape.name), rank \(options.rank), \(options.weightDType.rawValue)) to \(out)")
            if let activations { print("wrote activations for \(tokens) tokens to \(activations)") }
        }
    }
}
