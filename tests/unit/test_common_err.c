/* kms_err: codes, names and message wrapping. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <string.h>

#include "kms_err.h"

static void test_wrap_chain(void **state)
{
    struct kms_err err;
    (void)state;
    kms_err_clear(&err);
    assert_int_equal(kms_err_set(&err, KMS_ECHECKSUM, "checksum mismatch"), KMS_ECHECKSUM);
    assert_int_equal(kms_err_wrap(&err, KMS_EINVAL, "share %d", 2), KMS_ECHECKSUM);
    assert_int_equal(kms_err_wrap(&err, KMS_EINVAL, "unseal"), KMS_ECHECKSUM);
    assert_string_equal(err.msg, "unseal: share 2: checksum mismatch");
}

static void test_wrap_empty_starts_chain(void **state)
{
    struct kms_err err;
    (void)state;
    kms_err_clear(&err);
    assert_int_equal(kms_err_wrap(&err, KMS_ENOMEM, "init"), KMS_ENOMEM);
    assert_string_equal(err.msg, "init: out of memory");
}

static void test_names(void **state)
{
    (void)state;
    assert_string_equal(kms_errname(KMS_ETOOFEW), "KMS_ETOOFEW");
    assert_string_equal(kms_strerror(KMS_EDENIED), "permission denied");
    assert_string_equal(kms_strerror(-9999), "unknown error");
    assert_int_equal(kms_err_set(NULL, KMS_EIO, "x"), KMS_EIO);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_wrap_chain),
        cmocka_unit_test(test_wrap_empty_starts_chain),
        cmocka_unit_test(test_names),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
