import FerryTestSupport
import Foundation
import HostOS
import Testing

@Suite struct FileDescriptorTests {
    @Test func placeholder() {}
}
