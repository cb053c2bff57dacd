import CPhatgoose
@testable import PhatgooseC
import PhatgooseRuntime
import Testing

/// The C options struct as the runtime reads it: each field reaches `RuntimeOptions`, including for a caller built
/// against the ABI 1 header, whose struct ends before the later fields.
@Suite("C options")
struct COptionsTests {
    /// A struct initialised by the library at `size` bytes (inside a 96-byte buffer of 0xAB), changed by `edit`, and read
    /// back as `RuntimeOptions`.
    func read(size: Int = MemoryLayout<phatgoose_runtime_options>.size,
              _ edit: (inout phatgoose_runtime_options) -> Void = { _ in }) throws -> RuntimeOptions {
        let library = try synthLibrary()
        let raw = UnsafeMutableRawPointer.allocate(byteCount: 96, alignment: 8)
        defer { raw.deallocate() }
        raw.initializeMemory(as: UInt8.self, repeating: 0xAB, count: 96)
        let options = raw.bindMemory(to: phatgoose_runtime_options.self, capacity: 1)
        #expect(phatgoose_runtime_options_init(options, size) == PHATGOOSE_STATUS_OK)
        edit(&options.pointee)
        return try runtimeOptions(options, library: library)
    }

    @Test("spin_microseconds: 0 keeps the default 50, PHATGOOSE_SPIN_NONE sleeps at once, a value is taken")
    func spin() throws {
        #expect(try read().spinMicroseconds == 50)
        #expect(try read { $0.spin_microseconds = PHATGOOSE_SPIN_NONE }.spinMicroseconds == 0)
        #expect(try read { $0.spin_microseconds = 200 }.spinMicroseconds == 200)
    }

    @Test("parallel_min_tokens: 0 and 1 let any call fan out, a value is taken")
    func parallelMinTokens() throws {
        #expect(try read().parallelMinTokens == 1)
        #expect(try read { $0.parallel_min_tokens = 0 }.parallelMinTokens == 1)
        #expect(try read { $0.parallel_min_tokens = 64 }.parallelMinTokens == 64)
    }

    @Test("lanes: 0 is one per participant, a count is taken, a negative one refused; contended_min_tokens: 0 keeps 64, PHATGOOSE_CONTENDED_OFF turns it off")
    func lanesAndContention() throws {
        #expect(try read().lanes == nil)
        #expect(try read { $0.lanes = 1 }.lanes == 1)
        let refused = #expect(throws: ABIError.self) { _ = try read { $0.lanes = -1 } }
        #expect(refused?.message.contains("options lanes: expected 0 (one per participant) or more, found -1") == true)
        #expect(try read().contendedMinTokens == 64)
        #expect(try read { $0.contended_min_tokens = PHATGOOSE_CONTENDED_OFF }.contendedMinTokens == 0)
        #expect(try read { $0.contended_min_tokens = 8 }.contendedMinTokens == 8)
        #expect(throws: ABIError.self) { _ = try read { $0.contended_min_tokens = -2 } }
        // A struct of the previous size (up to parallel_min_tokens) leaves both at their defaults.
        let previous = try read(size: 64) { $0.workers = 1 }
        #expect(previous.lanes == nil && previous.contendedMinTokens == 64)
    }

    @Test("an ABI 1 struct (56 bytes) gets the later fields' defaults, whatever lies beyond it")
    func abi1() throws {
        let options = try read(size: 56) { $0.workers = 1 }
        #expect(options.workers == 1 && options.spinMicroseconds == 50 && options.parallelMinTokens == 1)
        #expect(options.lanes == nil && options.contendedMinTokens == 64)
    }
}
