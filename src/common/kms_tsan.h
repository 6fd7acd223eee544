/*
 * ThreadSanitizer annotations for happens-before edges that pass through
 * uninstrumented libraries (gRPC's completion queues synchronise with
 * absl/futex code TSAN cannot see). Release a tag before handing it to
 * gRPC (grpc_call_start_batch, grpc_server_request_call), acquire it when
 * grpc_completion_queue_next returns it: TSAN then knows that what the
 * submitting thread wrote is visible to the thread that gets the event.
 * No-ops outside a -fsanitize=thread build.
 */
#ifndef KMS_TSAN_H
#define KMS_TSAN_H

#if defined(__SANITIZE_THREAD__)
#define KMS_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define KMS_TSAN 1
#endif
#endif

#ifdef KMS_TSAN
void __tsan_acquire(void *addr);
void __tsan_release(void *addr);
#define KMS_TSAN_ACQUIRE(p) __tsan_acquire((void *)(p))
#define KMS_TSAN_RELEASE(p) __tsan_release((void *)(p))
#else
#define KMS_TSAN_ACQUIRE(p) ((void)(p))
#define KMS_TSAN_RELEASE(p) ((void)(p))
#endif

#endif /* KMS_TSAN_H */
