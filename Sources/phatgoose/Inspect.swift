import ArgumentParser
import PhatgooseFormats
import PhatgooseLibrary

struct Inspect: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Validate and describe a library directory, a packed library, or a .safetensors file.",
        discussion: "Exits 0 when PATH is valid; otherwise 1, with one line on stderr saying what is wrong and where."
    )

    @Argument(help: "A library directory, a packed library file, or a .safetensors file.")
    var path: String

    @Option(help: "Output format: text or json.")
    var format: OutputFormat = .text

    func run() throws {
        let report: JSONValue
        if ExpertLibrary.isDirectory(path) {
            report = LibraryReport.describe(try ExpertLibrary.loadDirectory(path))
        } else {
            let storage = try MappedFile(path: path)
            if ExpertLibrary.isPacked(storage) {
                report = LibraryReport.describe(try ExpertLibrary.loadPacked(path))
            } else {
                report = LibraryReport.describe(try SafetensorsFile(storage: storage))
            }
        }
        switch format {
        case .json: print(report.serialized())
        case .text: print(LibraryReport.text(report), terminator: "")
        }
    }
}
