@testable import Events
import FerryTestSupport
import Testing

@Suite("--event-monitor parsing")
struct EventSinkTargetTests {
    @Test("Accepted spellings", arguments: [
        ("path=/run/ferry/vm1.events", EventSinkTarget.path("/run/ferry/vm1.events")),
        ("path=relative/events", .path("relative/events")),
        ("path=/dir with spaces/a=b,c", .path("/dir with spaces/a=b,c")),
        ("fd=3", .fileDescriptor(3)),
        ("fd=0", .fileDescriptor(0)),
        ("fd=2147483647", .fileDescriptor(Int32.max)),
    ])
    func accepted(text: String, expected: EventSinkTarget) throws {
        let target = try EventSinkTarget(parsing: text)
        #expect(target == expected)
        #expect(target.description == text)
    }

    @Test("Rejected spellings say what to type instead", arguments: [
        ("", "write path=PATH or fd=N"),
        ("/run/ferry/vm1.events", "write path=/run/ferry/vm1.events"),
        ("3", "write fd=3"),
        ("path=", "write path=/run/ferry/vm.events"),
        ("fd=", "write fd=N"),
        ("fd=stdout", "write fd=N"),
        ("fd=-1", "write fd=N"),
        ("fd=+3", "write fd=N"),
        ("fd= 3", "write fd=N"),
        ("fd=2147483648", "write fd=N"),
        ("file=/tmp/x", "write path=PATH or fd=N"),
        ("Path=/tmp/x", "write path=PATH or fd=N"),
    ])
    func rejected(text: String, advice: String) {
        #expect {
            try EventSinkTarget(parsing: text)
        } throws: { error in
            guard let error = error as? EventsError else { return false }
            return error.kind == .invalidSinkTarget
                && error.description.hasPrefix("invalid --event-monitor: ")
                && error.description.contains(advice)
        }
    }
}
