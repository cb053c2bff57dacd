import ArgumentParser
import CPhatgoose
import PhatgooseDistributed
import PhatgooseFormats
import PhatgooseLibrary
import PhatgooseRouting
import PhatgooseRuntime
import PhatgooseSynth
#if canImport(Glibc)
import Glibc
#endif

/// The `phatgoose` command. Exit codes: 0 success, 1 bad input or data (one line on stderr naming the file, the
/// tensor or field, what was expected and what was found), 2 usage error.
@main
struct Phatgoose: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "phatgoose",
        abstract: "Serve PHATGOOSE routing among LoRA experts on CPUs.",
        // The C ABI's version: the tool and libphatgoose.so of one build report the same.
        version: String(cString: phatgoose_version()),
        subcommands: [Inspect.self, SynthCommand.self, Pack.self, Apply.self, ImportOfficialCommand.self, Bench.self, PlacementCommand.self, LoadTestCommand.self, ProfileCommand.self, ServeExperts.self]
    )

    static func main() {
        // Temporary files of interrupted writes are removed on SIGINT, SIGTERM, SIGHUP and SIGQUIT.
        TemporaryFiles.removeOnSignals()
        let command: ParsableCommand
        do {
            command = try parseAsRoot()
        } catch {
            if exitCode(for: error) == .success { exit(withError: error) }  // --help, --version
            printError(fullMessage(for: error))
            Glibc.exit(2)
        }
        do {
            var runnable = command
            try runnable.run()
        } catch let exit as ExitCode {
            Glibc.exit(exit.rawValue)
        } catch let error as ValidationError {
            printError("phatgoose: \(error)")
            Glibc.exit(2)
        } catch {
            if isDataError(error) {
                // Bad input or data: one line naming the file, the tensor or field, what was expected and what was found.
                printError("phatgoose: \(String(describing: error).split(separator: "\n").joined(separator: " "))")
                Glibc.exit(1)
            }
            // Help requests and parse errors that surface while running.
            switch exitCode(for: error) {
            case .success: exit(withError: error)
            case .validationFailure:
                printError(fullMessage(for: error))
                Glibc.exit(2)
            default:
                printError("phatgoose: \(String(describing: error).split(separator: "\n").joined(separator: " "))")
                Glibc.exit(1)
            }
        }
    }
}

/// Errors of Phatgoose's own modules, which describe bad input or data.
func isDataError(_ error: any Error) -> Bool {
    error is FormatError || error is LibraryError || error is RoutingError || error is SynthError || error is RuntimeError || error is DistributedError
}

func printError(_ message: String) {
    var line = message
    if !line.hasSuffix("\n") { line += "\n" }
    // Written with write(2) on fd 2: the C `stderr` global is shared mutable state to Swift 6.
    _ = line.utf8CString.withUnsafeBufferPointer { Glibc.write(2, $0.baseAddress, $0.count - 1) }
}

/// `--format text|json` for commands that print results.
enum OutputFormat: String, ExpressibleByArgument, CaseIterable {
    case text
    case json
}
