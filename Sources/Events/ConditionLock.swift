#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// A pthread mutex with condition variables tied to it. The pthread objects live in heap memory this
/// class owns, because they must not move once initialised.
final class ConditionLock: @unchecked Sendable {
    private let mutex: UnsafeMutablePointer<pthread_mutex_t>

    init() {
        mutex = .allocate(capacity: 1)
        pthread_mutex_init(mutex, nil)
    }

    deinit {
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
    }

    func withLock<Result>(_ body: () throws -> Result) rethrows -> Result {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return try body()
    }

    /// A condition variable to wait on while holding this lock.
    final class Condition: @unchecked Sendable {
        private let condition: UnsafeMutablePointer<pthread_cond_t>
        private let lock: ConditionLock

        init(_ lock: ConditionLock) {
            self.lock = lock
            condition = .allocate(capacity: 1)
            #if os(Linux)
            var attributes = pthread_condattr_t()
            pthread_condattr_init(&attributes)
            pthread_condattr_setclock(&attributes, CLOCK_MONOTONIC)
            pthread_cond_init(condition, &attributes)
            pthread_condattr_destroy(&attributes)
            #else
            pthread_cond_init(condition, nil)
            #endif
        }

        deinit {
            pthread_cond_destroy(condition)
            condition.deallocate()
        }

        /// Waits for a signal; call only inside `lock.withLock`. Spurious wake-ups happen: re-check.
        func wait() {
            pthread_cond_wait(condition, lock.mutex)
        }

        /// Waits for a signal or until `timeout` has passed; call only inside `lock.withLock`.
        /// Spurious wake-ups happen: re-check.
        func wait(timeout: Duration) {
            guard timeout > .zero else { return }
            let (seconds, attoseconds) = timeout.components
            let nanoseconds = Int(attoseconds / 1_000_000_000)
            #if os(Linux)
            var deadline = timespec()
            clock_gettime(CLOCK_MONOTONIC, &deadline)
            var totalNanoseconds = deadline.tv_nsec + nanoseconds
            deadline.tv_sec += Int(seconds) + totalNanoseconds / 1_000_000_000
            totalNanoseconds %= 1_000_000_000
            deadline.tv_nsec = totalNanoseconds
            pthread_cond_timedwait(condition, lock.mutex, &deadline)
            #else
            var relative = timespec(tv_sec: Int(seconds), tv_nsec: nanoseconds)
            pthread_cond_timedwait_relative_np(condition, lock.mutex, &relative)
            #endif
        }

        func signal() {
            pthread_cond_signal(condition)
        }

        func broadcast() {
            pthread_cond_broadcast(condition)
        }
    }
}
