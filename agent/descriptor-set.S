/* SPDX-License-Identifier: Apache-2.0 */
/* The FileDescriptorSet written by protoc (--include_imports), linked in as read-only data:
 * the source of streaming kinds and of server reflection. See agent/descriptor-set.h. */
	.section .rodata
	.balign 8
	.globl ember_descriptor_set
	.type ember_descriptor_set, @object
ember_descriptor_set:
	.incbin DESCRIPTOR_SET_FILE
ember_descriptor_set_end:
	.size ember_descriptor_set, ember_descriptor_set_end - ember_descriptor_set

	.balign 8
	.globl ember_descriptor_set_size
	.type ember_descriptor_set_size, @object
ember_descriptor_set_size:
	.quad ember_descriptor_set_end - ember_descriptor_set
	.size ember_descriptor_set_size, 8

	.section .note.GNU-stack,"",@progbits
