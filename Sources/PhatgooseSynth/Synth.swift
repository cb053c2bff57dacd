import Foundation
import PhatgooseFormats
import PhatgooseLibrary

/// What `phatgoose synth` generates.
public struct SynthOptions: Sendable {
    /// The model whose layers every expert adapts.
    public var shape: ModelShape
    /// Number of experts (at least 1).
    public var experts: Int
    /// LoRA rank r of every expert at every layer (at least 1).
    public var rank: Int
    /// `lora_alpha` written to each adapter config (finite).
    public var alpha: Double
    /// `use_rslora` written to each adapter config.
    public var useRSLoRA: Bool
    /// Storage dtype of lora_A and lora_B.
    public var weightDType: DType
    /// Storage dtype of the gate vectors.
    public var gateDType: DType
    /// Seed of every generated value: the same options give the same files.
    public var seed: UInt64
    /// Number of tasks the experts cluster around (experts are dealt to tasks round-robin).
    public var tasks: Int
    /// Zipf exponent of how often each task occurs in activations (0 = all equally often).
    public var popularity: Double
    /// Fraction of the layers each expert adapts (1 = all); the rest are skipped per expert at random.
    public var coverage: Double
    /// Write library.json (otherwise the directory-scan rule applies).
    public var manifest: Bool
    /// `top_k` of the library's routing defaults (at least 1).
    public var topK: Int

    /// Creates options; each argument sets the property of the same name, except that `tasks` defaults to
    /// one task per four experts, rounded up.
    public init(shape: ModelShape, experts: Int = 8, rank: Int = 16, alpha: Double = 1, useRSLoRA: Bool = false,
                weightDType: DType = .bf16, gateDType: DType = .f32, seed: UInt64 = 0, tasks: Int? = nil,
                popularity: Double = 1, coverage: Double = 1, manifest: Bool = true, topK: Int = 2) {
        self.shape = shape
        self.experts = experts
        self.rank = rank
        self.alpha = alpha
        self.useRSLoRA = useRSLoRA
        self.weightDType = weightDType
        self.gateDType = gateDType
        self.seed = seed
        self.tasks = tasks ?? max(1, (experts + 3) / 4)
        self.popularity = popularity
        self.coverage = coverage
        self.manifest = manifest
        self.topK = topK
    }

    /// Expert directory names: zero-padded so byte order is index order.
    public func expertName(_ e: Int) -> String {
        let digits = String(max(experts - 1, 0)).count
        let number = String(e)
        return "expert" + String(repeating: "0", count: max(0, digits - number.count)) + number
    }

    /// The task expert `e` belongs to (experts are dealt to tasks round-robin).
    public func task(ofExpert e: Int) -> Int { e % tasks }
}

/// Synthetic libraries and activations shaped like real PHATGOOSE routing: each task has a direction per layer;
/// an expert's gate is its task's direction plus noise, and a sequence's tokens are a shared component plus their
/// task's direction plus noise, so tokens of one sequence prefer the experts of their task, and a popularity
/// parameter skews how often each task occurs. Every value is derived from (seed, what, layer, index), so the same
/// options always give the same files, and activations match their library.
public enum Synth {
    /// Writes a library directory in the user layout (PEFT adapters, gates, optional manifest).
    /// The directory must not exist or be empty: it is built in a staging directory beside it and renamed into
    /// place when complete, so nothing is overwritten and a failure or interruption leaves nothing behind.
    public static func writeLibrary(_ options: SynthOptions, to directory: String) throws {
        try validate(options)
        let stage = try StagedDirectory(destination: directory)
        let layers = options.shape.layers
        var entries: [LibraryManifest.Entry] = []
        for e in 0..<options.experts {
            let name = options.expertName(e)
            _ = try stage.directory(name)
            var adapter = SafetensorsWriter()
            var gates = SafetensorsWriter()
            for (l, layer) in layers.enumerated() where adapts(options, expert: e, layer: l) {
                let values = expertValues(options, expert: e, layer: l)
                adapter.add("base_model.model.\(layer.name).lora_A.weight", floats: values.a, shape: [options.rank, layer.inWidth], as: options.weightDType)
                adapter.add("base_model.model.\(layer.name).lora_B.weight", floats: values.b, shape: [layer.outWidth, options.rank], as: options.weightDType)
                gates.add(layer.name, floats: values.gate, shape: [layer.inWidth], as: options.gateDType)
            }
            adapter.metadata = ["format": "pt"]
            try adapter.write(to: stage.file(name + "/adapter_model.safetensors"))
            try gates.write(to: stage.file(name + "/gates.safetensors"))
            let targets = Array(Set(layers.map { String($0.name.split(separator: ".").last!) })).sorted()
            let config = JSONValue.object([
                ("peft_type", .string("LORA")),
                ("task_type", .string("SEQ_2_SEQ_LM")),
                ("r", .integer(options.rank)),
                ("lora_alpha", .double(options.alpha)),
                ("use_rslora", .bool(options.useRSLoRA)),
                ("target_modules", .array(targets.map { .string($0) })),
                ("rank_pattern", .object([])),
                ("alpha_pattern", .object([])),
                ("fan_in_fan_out", .bool(false)),
                ("bias", .string("none")),
                ("modules_to_save", .null),
                ("lora_dropout", .double(0)),
            ])
            try writeText(config.serialized() + "\n", to: stage.file(name + "/adapter_config.json"))
            entries.append(LibraryManifest.Entry(name: name, path: name))
        }
        if options.manifest {
            let manifest = LibraryManifest(experts: entries, routing: RoutingDefaults(router: .phatgoose, topK: options.topK))
            try writeText(manifest.document().serialized() + "\n", to: stage.file("library.json"))
        }
        try stage.commit()
    }

    /// Token activations for every layer, keyed by layer name, F32 [tokens, in], for `phatgoose apply`. Tokens come
    /// in sequences of `sequenceLength`, each drawn from one task by popularity.
    public static func writeActivations(_ options: SynthOptions, tokens: Int, sequenceLength: Int, seed: UInt64,
                                        to path: String) throws {
        try validate(options)
        var writer = SafetensorsWriter()
        for (l, layer) in options.shape.layers.enumerated() {
            writer.add(layer.name, floats: activations(options, layer: l, tokens: tokens, sequenceLength: sequenceLength, seed: seed),
                       shape: [tokens, layer.inWidth])
        }
        try writer.write(to: path)
    }

    /// The task of each sequence, drawn by Zipf popularity.
    public static func sequenceTasks(_ options: SynthOptions, count: Int, seed: UInt64) -> [Int] {
        var weights = (0..<options.tasks).map { 1 / pow(Double($0 + 1), options.popularity) }
        let total = weights.reduce(0, +)
        weights = weights.map { $0 / total }
        var rng = SplitMix64(options.seed, 3, seed, 0)
        return (0..<count).map { _ in
            var u = rng.unitDouble()
            for (t, w) in weights.enumerated() {
                if u < w { return t }
                u -= w
            }
            return options.tasks - 1
        }
    }

    /// Activations of one layer: F32 [tokens, in].
    public static func activations(_ options: SynthOptions, layer l: Int, tokens: Int, sequenceLength: Int, seed: UInt64) -> [Float] {
        let width = options.shape.layers[l].inWidth
        let sequences = (tokens + sequenceLength - 1) / max(sequenceLength, 1)
        let tasks = sequenceTasks(options, count: sequences, seed: seed)
        var shared = SplitMix64(options.seed, 4, UInt64(l), 0)
        let common = (0..<width).map { _ in shared.normal() }
        var directions: [Int: [Float]] = [:]
        var rng = SplitMix64(options.seed, 5, seed, UInt64(l))
        var result = [Float](repeating: 0, count: tokens * width)
        for t in 0..<tokens {
            let task = tasks[t / sequenceLength]
            if directions[task] == nil { directions[task] = taskDirection(options, task: task, layer: l, width: width) }
            let direction = directions[task]!
            for i in 0..<width { result[t * width + i] = 0.5 * common[i] + direction[i] + rng.normal() }
        }
        return result
    }

    /// An expert's A [r, in], B [out, r] and gate [in] at a layer, in F32.
    static func expertValues(_ options: SynthOptions, expert e: Int, layer l: Int) -> (a: [Float], b: [Float], gate: [Float]) {
        let layer = options.shape.layers[l]
        var rng = SplitMix64(options.seed, 1, UInt64(e), UInt64(l))
        let aBound = Float(1 / Double(layer.inWidth).squareRoot())
        let a = (0..<(options.rank * layer.inWidth)).map { _ in rng.uniform(-aBound, aBound) }
        let b = (0..<(layer.outWidth * options.rank)).map { _ in rng.uniform(-0.02, 0.02) }
        var gate = taskDirection(options, task: options.task(ofExpert: e), layer: l, width: layer.inWidth)
        var noise = SplitMix64(options.seed, 2, UInt64(e), UInt64(l))
        for i in gate.indices { gate[i] += 0.5 * noise.normal() }
        return (a, b, gate)
    }

    static func taskDirection(_ options: SynthOptions, task: Int, layer: Int, width: Int) -> [Float] {
        var rng = SplitMix64(options.seed, 6, UInt64(task), UInt64(layer))
        return (0..<width).map { _ in rng.normal() }
    }

    static func adapts(_ options: SynthOptions, expert: Int, layer: Int) -> Bool {
        guard options.coverage < 1 else { return true }
        var rng = SplitMix64(options.seed, 7, UInt64(expert), UInt64(layer))
        // Expert 0 adapts every layer so each layer has at least one candidate.
        return expert == 0 || rng.unitDouble() < options.coverage
    }

    static func validate(_ options: SynthOptions) throws {
        func bad(_ what: String) -> SynthError { SynthError(message: what) }
        guard options.experts >= 1 else { throw bad("experts: expected at least 1, found \(options.experts)") }
        guard options.rank >= 1 else { throw bad("rank: expected at least 1, found \(options.rank)") }
        guard options.alpha.isFinite else { throw bad("alpha: expected a finite number, found \(options.alpha)") }
        guard options.weightDType.isComputeFloat, options.gateDType.isComputeFloat else { throw bad("dtype: expected f32, f16 or bf16") }
        guard options.tasks >= 1 else { throw bad("tasks: expected at least 1, found \(options.tasks)") }
        guard options.coverage > 0, options.coverage <= 1 else { throw bad("coverage: expected a fraction in (0, 1], found \(options.coverage)") }
        guard options.popularity >= 0, options.popularity.isFinite else { throw bad("popularity: expected a number >= 0, found \(options.popularity)") }
        guard !options.shape.layers.isEmpty else { throw bad("layers: expected at least one layer") }
        guard options.topK >= 1 else { throw bad("top-k: expected at least 1, found \(options.topK)") }
        var names = Set<String>()
        for layer in options.shape.layers {
            guard layer.inWidth >= 1, layer.outWidth >= 1 else { throw bad("layer \(layer.name): expected positive widths, found \(layer.inWidth)x\(layer.outWidth)") }
            guard names.insert(layer.name).inserted else { throw bad("layer \(layer.name): expected unique layer names, found it twice") }
        }
    }

    static func writeText(_ text: String, to path: String) throws {
        let file = try AtomicFile(path: path)
        try file.write(Array(text.utf8))
        try file.commit()
    }
}

/// A bad synth option.
public struct SynthError: Error, Sendable, CustomStringConvertible {
    /// Which option is bad: what was expected and what was found.
    public let message: String
    /// The message.
    public var description: String { message }
}

/// SplitMix64 seeded from several words: small, fast and reproducible everywhere.
struct SplitMix64 {
    var state: UInt64

    init(_ words: UInt64...) {
        state = 0x9E37_79B9_7F4A_7C15
        for word in words { state = Self.mix(state ^ word &+ 0x632B_E59B_D9B4_E019) }
    }

    static func mix(_ value: UInt64) -> UInt64 {
        var z = value &+ 0x9E37_79B9_7F4A_7C15
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    mutating func next() -> UInt64 {
        state = state &+ 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    mutating func unitDouble() -> Double { Double(next() >> 11) * 0x1p-53 }

    mutating func uniform(_ low: Float, _ high: Float) -> Float {
        low + (high - low) * Float(next() >> 40) * 0x1p-24
    }

    /// Standard normal (Box-Muller).
    mutating func normal() -> Float {
        let u1 = max(unitDouble(), 0x1p-53), u2 = unitDouble()
        return Float((-2 * log(u1)).squareRoot() * cos(2 * Double.pi * u2))
    }
}
