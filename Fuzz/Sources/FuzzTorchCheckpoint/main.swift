import CFuzzDriver
#if canImport(Glibc)
import Glibc
#endif

// libFuzzer drives the target; SwiftPM owns `main`, so the driver is entered explicitly.
var argc = CommandLine.argc
var argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>? = CommandLine.unsafeArgv
exit(LLVMFuzzerRunDriver(&argc, &argv) { data, size in fuzzTorchCheckpoint(data!, size) })
