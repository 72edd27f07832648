/* SPDX-License-Identifier: Apache-2.0 */
/* The operator's page (agent/test-page.html), linked in as read-only data: the binary serves
 * it with nothing to install beside it. See agent/http.c. */
	.section .rodata
	.balign 8
	.globl ember_test_page
	.type ember_test_page, @object
ember_test_page:
	.incbin TEST_PAGE_FILE
ember_test_page_end:
	.size ember_test_page, ember_test_page_end - ember_test_page

	.balign 8
	.globl ember_test_page_size
	.type ember_test_page_size, @object
ember_test_page_size:
	.quad ember_test_page_end - ember_test_page
	.size ember_test_page_size, 8

	.section .note.GNU-stack,"",@progbits
