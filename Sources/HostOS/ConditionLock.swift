#if canImport(Glibc)
import Glibc
#endif

/// A pthread mutex with condition variables tied to it, whose timed waits run on the monotonic
/// clock (a wall-clock jump never shortens or stretches them). The pthread objects live in heap
/// memory this class owns, because they must not move once initialised.
public final class ConditionLock: @unchecked Sendable {
    private let mutex: UnsafeMutablePointer<pthread_mutex_t>

    public init() {
        mutex = .allocate(capacity: 1)
        pthread_mutex_init(mutex, nil)
    }

    deinit {
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
    }

    public func withLock<Result, Failure: Error>(_ body: () throws(Failure) -> Result) throws(Failure) -> Result {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return try body()
    }

    /// Runs `body` with the lock released; call only inside `withLock`.
    public func withoutLock<Result, Failure: Error>(_ body: () throws(Failure) -> Result) throws(Failure) -> Result {
        pthread_mutex_unlock(mutex)
        defer { pthread_mutex_lock(mutex) }
        return try body()
    }

    /// A condition variable to wait on while holding this lock.
    public final class Condition: @unchecked Sendable {
        private let condition: UnsafeMutablePointer<pthread_cond_t>
        private let lock: ConditionLock

        public init(_ lock: ConditionLock) {
            self.lock = lock
            condition = .allocate(capacity: 1)
            var attributes = pthread_condattr_t()
            pthread_condattr_init(&attributes)
            pthread_condattr_setclock(&attributes, CLOCK_MONOTONIC)
            pthread_cond_init(condition, &attributes)
            pthread_condattr_destroy(&attributes)
        }

        deinit {
            pthread_cond_destroy(condition)
            condition.deallocate()
        }

        /// Waits for a signal; call only inside `lock.withLock`. Spurious wake-ups happen: re-check.
        public func wait() {
            pthread_cond_wait(condition, lock.mutex)
        }

        /// Waits for a signal or until `deadline`; call only inside `lock.withLock`. Returns false
        /// once the deadline has passed. Spurious wake-ups happen: re-check.
        @discardableResult
        public func wait(until deadline: ContinuousClock.Instant) -> Bool {
            let remaining = deadline - .now
            guard remaining > .zero else { return false }
            let (seconds, attoseconds) = remaining.components
            var time = timespec()
            clock_gettime(CLOCK_MONOTONIC, &time)
            let nanoseconds = time.tv_nsec + Int(attoseconds / 1_000_000_000)
            time.tv_sec += Int(seconds) + nanoseconds / 1_000_000_000
            time.tv_nsec = nanoseconds % 1_000_000_000
            pthread_cond_timedwait(condition, lock.mutex, &time)
            return ContinuousClock.now < deadline
        }

        public func signal() {
            pthread_cond_signal(condition)
        }

        public func broadcast() {
            pthread_cond_broadcast(condition)
        }
    }
}
