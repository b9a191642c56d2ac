import CSandbox
import FerryTestSupport
@testable import HostOS
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// The filters of `SeccompPolicy` loaded for real, on a thread of this test process made for the
/// purpose (a filter stays with its thread, which then ends). The SIGSYS reporter runs in its
/// record-only mode here: it records the forbidden call and makes it fail with ENOSYS, where in
/// `ferry` it names the call and ends the process.
@Suite(.serialized) struct SeccompTests {
    init() {
        ferry_seccomp_install_reporter(1)
    }

    @Test func aCallOutsideTheVCPUListIsCaughtAndOneInsideItRuns() throws {
        let outcome = try BackgroundThread { () throws -> (parent: Int, caught: Int, pid: Int32) in
            try Seccomp.load(.vcpu, mode: .enforce, allThreads: false, name: "test-vcpu")
            let pid = getpid()  // in every list
            let parent = Int(getppid())  // in no thread's list but the VMM's
            return (parent, ferry_seccomp_last_recorded(), pid)
        }.join()
        #expect(outcome.caught == ferry_seccomp_number("getppid"), "the filter caught getppid: \(outcome)")
        // getppid's wrapper cannot fail, so it hands back the kernel's -ENOSYS as it is.
        #expect(outcome.parent == -Int(ENOSYS), "the call failed instead of running: \(outcome)")
        #expect(outcome.pid == getpid(), "an allowed call ran")
        #expect(!SeccompPolicy.allowed(for: .vcpu).contains("getppid") && SeccompPolicy.allowed(for: .vmm).contains("getppid"))
    }

    @Test func logModeAllowsTheCall() throws {
        let before = ferry_seccomp_last_recorded()
        let (parent, filters) = try BackgroundThread { () throws -> (Int, String) in
            try Seccomp.load(.vcpu, mode: .log, allThreads: false, name: "test-log")
            let status = (try? String(contentsOfFile: "/proc/thread-self/status", encoding: .utf8)) ?? ""
            let filters = status.split(separator: "\n").first { $0.hasPrefix("Seccomp_filters:") }.map(String.init) ?? ""
            return (Int(getppid()), filters)
        }.join()
        #expect(filters.hasSuffix("\t1"), "the thread has the filter: \(filters)")
        #expect(parent == Int(getppid()), "the call ran")
        #expect(ferry_seccomp_last_recorded() == before, "nothing was trapped")
    }

    /// Each narrow list is inside the VMM's: a thread is held to both.
    @Test func everyThreadsListIsInsideTheVMMsAndNamesRealCalls() throws {
        let vmm = Set(SeccompPolicy.allowed(for: .vmm))
        for kind in SeccompPolicy.ThreadKind.allCases {
            let list = SeccompPolicy.allowed(for: kind)
            #expect(Set(list).isSubset(of: vmm), "\(kind): \(Set(list).subtracting(vmm))")
            print("seccomp list \(kind.rawValue): \(Set(list).count) system calls")
        }
        // Loading resolves every name: a typo would fail here.
        for kind in SeccompPolicy.ThreadKind.allCases {
            try BackgroundThread { () throws -> Void in
                try Seccomp.load(kind, mode: .log, allThreads: false, name: "test-\(kind.rawValue)")
            }.join()
        }
    }
}

extension SeccompTests {
    /// With an `ioctl` list, only its requests pass the filter; others are caught like a call
    /// outside the list.
    @Test func onlyTheListedIoctlRequestsPass() throws {
        let allowed: UInt = 0xAE80  // KVM_RUN
        let forbidden: UInt = 0x5412  // TIOCSTI: pushing input into a terminal
        let outcome = try BackgroundThread { () throws -> (allowed: Int32, allowedErrno: Int32, forbidden: Int32, caught: Int) in
            try Seccomp.load(.vcpu, mode: .enforce, allThreads: false, name: "test-ioctl", ioctls: [allowed])
            let before = ferry_seccomp_last_recorded()
            errno = 0
            let passed = ioctl(-1, allowed)  // reaches the kernel: a bad descriptor
            let passedErrno = errno
            let stopped = ioctl(-1, forbidden)
            let caught = ferry_seccomp_last_recorded()
            return (passed, passedErrno, stopped, caught == before ? -1 : caught)
        }.join()
        #expect(outcome.allowed == -1 && outcome.allowedErrno == EBADF, "\(outcome)")
        #expect(outcome.caught == ferry_seccomp_number("ioctl"), "the forbidden request was caught: \(outcome)")
    }
}
