import ArgumentParser
import PhatgooseFormats
import PhatgooseLibrary

struct Pack: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Pack a library into one memory-mappable file (see docs/formats.md).",
        discussion: """
            The library is fully validated first; the packed file is written atomically (on any error or \
            interruption no file is left behind), and an output that is (or resolves to) a file of the library is \
            refused.
            """
    )

    @Argument(help: "A library directory (or a packed library, to re-pack).")
    var library: String

    @Option(help: "The packed file to write.")
    var out: String

    @Option(help: "Output format for the summary: text or json.")
    var format: OutputFormat = .text

    func run() throws {
        try OutputPath.refuseOverwriting(out, option: "--out", inputs: [library])
        let loaded = try ExpertLibrary.load(path: library)
        try loaded.writePacked(to: out)
        switch format {
        case .json:
            print(JSONValue.object([("packed", .string(out)), ("experts", .integer(loaded.experts.count)),
                                    ("modules", .integer(loaded.modules.count)), ("bytes", .integer(loaded.weightByteCount))]).serialized())
        case .text:
            print("packed \(loaded.experts.count) experts x \(loaded.modules.count) modules (\(LibraryReport.formatBytes(loaded.weightByteCount))) into \(out)")
        }
    }
}
