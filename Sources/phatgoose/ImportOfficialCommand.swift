import ArgumentParser
import PhatgooseFormats
import PhatgooseLibrary

struct ImportOfficialCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "import-official",
        abstract: "Convert an official PHATGOOSE checkpoint (r-three/phatgoose best.pt) into an expert library.",
        discussion: """
            CHECKPOINT is a torch.save zip archive of a T5 state dict with the experts as addons: per module <m> and \
            expert i, <m>._addons.expert_lora.layer1__i [in, r], layer2__i [r, out] and \
            <m>._addons.router.expert_embeddings__i [in]; other keys are ignored. The library gets lora_A = layer1 \
            transposed, lora_B = layer2 transposed, lora_alpha 1 (scale 1/r, as the official code divides by the rank), \
            the embeddings as gates, the tensors' own dtypes and a library.json. The pickle is read by a restricted \
            reader that refuses every global a tensor state dict does not need: no code in a checkpoint ever runs. \
            The library is built in a hidden staging directory beside DIR and renamed into place when complete: on \
            any error or interruption nothing is left behind.
            """
    )

    @Argument(help: "The checkpoint (best.pt).")
    var checkpoint: String

    @Option(help: "The library directory to create (must not exist, or be empty).")
    var out: String

    @Option(help: "Expert names in index order, comma-separated (default: expert0, expert1, ... zero-padded).")
    var names: String?

    @Option(parsing: .unconditional, help: "Default top-k written to library.json.")
    var topK: Int = 2

    @Option(help: "Output format for the summary: text or json.")
    var format: OutputFormat = .text

    func validate() throws {
        guard topK >= 1 else { throw ValidationError("--top-k: expected an integer >= 1, found \(topK)") }
    }

    func run() throws {
        try OutputPath.refuseOverwriting(out, option: "--out", inputs: [checkpoint])
        let list = names.map { $0.split(separator: ",", omittingEmptySubsequences: false).map { String($0) } }
        let summary = try OfficialCheckpointImport.run(checkpoint: checkpoint, to: out, names: list, topK: topK)
        switch format {
        case .json:
            print(JSONValue.object([
                ("library", .string(out)), ("experts", .array(summary.experts.map { .string($0) })),
                ("modules", .integer(summary.modules)), ("weight_bytes", .integer(summary.weightBytes)),
                ("dtypes", .array(summary.dtypes.map { .string($0) })), ("ignored_keys", .integer(summary.ignoredKeys)),
            ]).serialized())
        case .text:
            print("imported \(summary.experts.count) experts x \(summary.modules) modules (\(LibraryReport.formatBytes(summary.weightBytes)), \(summary.dtypes.joined(separator: ", "))) into \(out); \(summary.ignoredKeys) other keys ignored")
        }
    }
}
