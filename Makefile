# ember — top-level, non-recursive Makefile (in the manner of kvmtool's).
#
#   make                 build everything into build/
#   make deps            install the Debian packages the build and the tests need (idempotent)
#   make run             deps + build + start emberd in the foreground with embedded defaults
#   make check           deps + build + every test (unit, integration)
#   make SANITIZE=1 check   the same with ASan+UBSan (objects in build/sanitize/)
#   make lint            clang-format check, clang-tidy, cppcheck
#   make bench-rpc       GetNode latency and throughput over the unix socket
#   make install DESTDIR=… PREFIX=…
#   make clean

# The version is debian/changelog's (its first line, "ember (VERSION) …"): one place for
# emberd --version, the packages and the manual pages. Read with sed, not dpkg-parsechangelog,
# so that building needs no dpkg-dev.
VERSION := $(or $(shell sed -n '1s/^[^(]*(\([^)]*\)).*/\1/p' debian/changelog 2>/dev/null),unknown)

PREFIX ?= /usr/local
BINDIR ?= $(PREFIX)/bin
SBINDIR ?= $(PREFIX)/sbin
# /etc unless installing into a private prefix
SYSCONFDIR ?= $(if $(filter /usr,$(PREFIX)),/etc,$(PREFIX)/etc)
SYSTEMDUNITDIR ?= $(if $(filter /usr,$(PREFIX)),/lib/systemd/system,$(PREFIX)/lib/systemd/system)
DOCDIR ?= $(PREFIX)/share/doc/ember
# Helpers emberd runs (ember-uffd): not for a user's PATH.
LIBEXECDIR ?= $(PREFIX)/lib/ember
# Guest binaries (ember-init, ember-guest): never run on the host; ember-mkrootfs copies them
# into root images and is told this path at install time.
GUESTDIR ?= $(PREFIX)/lib/ember/guest
DESTDIR ?=

ifeq ($(SANITIZE),1)
B ?= build/sanitize
SAN_FLAGS := -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined
else
B ?= build
SAN_FLAGS :=
endif

SHELL := /bin/bash
CC ?= gcc
PKG_CONFIG ?= pkg-config
PROTOC ?= protoc
PROTOC_C ?= protoc-c
PYTHON ?= /usr/bin/python3

PKGS := grpc libprotobuf-c inih libsystemd devmapper libnl-3.0 libnl-route-3.0 libnftables json-c \
	libmicrohttpd libcrypto libcurl
PKG_CFLAGS = $(shell $(PKG_CONFIG) --cflags $(PKGS) 2>/dev/null)
PKG_LIBS = $(shell $(PKG_CONFIG) --libs $(PKGS) 2>/dev/null)
CMOCKA_CFLAGS = $(shell $(PKG_CONFIG) --cflags cmocka 2>/dev/null)
CMOCKA_LIBS = $(shell $(PKG_CONFIG) --libs cmocka 2>/dev/null)

# kvmtool's extra warnings, less the ones generated protobuf-c code cannot meet.
WARNINGS := -Wall -Wextra -Werror -Wformat=2 -Winit-self -Wmissing-declarations \
	-Wmissing-prototypes -Wnested-externs -Wold-style-definition -Wredundant-decls \
	-Wsign-compare -Wstrict-prototypes -Wundef -Wvolatile-register-var -Wwrite-strings \
	-Wshadow -Wno-format-nonliteral -Wvla
GEN_WARNINGS := -Wall -Wextra -Werror

CFLAGS ?= -O2 -g
# The project's flags come first so that CFLAGS/CPPFLAGS/LDFLAGS from the environment win.
BASE_CPPFLAGS := -D_GNU_SOURCE -DEMBER_VERSION='"$(VERSION)"' \
	-DEMBER_SYSCONFDIR='"$(SYSCONFDIR)"' -I. -I$(B)/proto
BASE_CFLAGS := -std=gnu11 -pthread -fno-strict-aliasing -fstack-protector-strong \
	-D_FORTIFY_SOURCE=2 $(SAN_FLAGS)
ALL_CPPFLAGS = $(BASE_CPPFLAGS) $(PKG_CFLAGS) $(CPPFLAGS)
ALL_CFLAGS = $(BASE_CFLAGS) $(CFLAGS)
ALL_LDFLAGS = -pthread $(SAN_FLAGS) $(LDFLAGS)

ifeq ($(V),1)
Q :=
else
Q := @
endif

all: $(B)/emberd $(B)/fcsim $(B)/test/rpctestd $(B)/test/rpc-bench $(B)/test/exec-bench $(B)/test/storage-tool \
	$(B)/test/netns-tool $(B)/test/guest-standin $(B)/test/guest-helper $(B)/test/fcctl-tool \
	$(B)/ember-uffd $(B)/test/bench-uffd $(B)/test/fuzz-uffd-handshake-replay $(B)/ember-guest \
	$(B)/ember-init $(B)/test/guest-tool $(B)/test/lifecycle-direct $(B)/test/emberd-hooks \
	$(B)/test/hostile-guest $(B)/test/pbjson-tool $(B)/test/fuzz-pbjson-replay unit-tests pystubs

# ---------------------------------------------------------------------------------------------
# protobuf: C for the daemon, Python for the tests, one descriptor set for streaming kinds and
# reflection (embedded in the binary)

PROTO_SYS := /usr/include
GRPC_PROTO := /usr/share/grpc-proto
EMBER_PROTOS := ember/v1/node.proto
WKT_PROTOS := google/protobuf/timestamp.proto google/protobuf/duration.proto \
	google/protobuf/field_mask.proto
GRPC_PROTOS := grpc/health/v1/health.proto grpc/reflection/v1/reflection.proto \
	grpc/reflection/v1alpha/reflection.proto

PROTO_C := $(patsubst %.proto,$(B)/proto/%.pb-c.c,$(EMBER_PROTOS) $(WKT_PROTOS) $(GRPC_PROTOS) \
	google/protobuf/descriptor.proto)
PROTO_H := $(PROTO_C:.c=.h)
PROTO_OBJS := $(PROTO_C:.c=.o)

$(B)/proto/.stamp-c: proto/ember/v1/node.proto
	@mkdir -p $(B)/proto
	@echo "  PROTOC-C $@"
	$(Q)$(PROTOC_C) -Iproto -I$(PROTO_SYS) --c_out=$(B)/proto $(EMBER_PROTOS)
	$(Q)$(PROTOC_C) -I$(PROTO_SYS) --c_out=$(B)/proto $(WKT_PROTOS) \
		google/protobuf/descriptor.proto
	$(Q)$(PROTOC_C) -I$(GRPC_PROTO) --c_out=$(B)/proto $(GRPC_PROTOS)
	$(Q)touch $@
$(PROTO_C) $(PROTO_H): $(B)/proto/.stamp-c

# --include_imports: reflection must be able to hand out every dependency.
$(B)/proto/ember.desc: proto/ember/v1/node.proto
	@mkdir -p $(@D)
	@echo "  PROTOC   $@"
	$(Q)$(PROTOC) -Iproto -I$(PROTO_SYS) -I$(GRPC_PROTO) --include_imports \
		--descriptor_set_out=$@ $(EMBER_PROTOS) $(GRPC_PROTOS)

# The guest protocol (package ember.guest.v1) is internal to ember, between the host and
# ember-guest: not in EMBER_PROTOS, so emberd's reflection does not offer it.
$(B)/proto/.stamp-guest-c: proto/ember/v1/guest.proto
	@mkdir -p $(B)/proto
	@echo "  PROTOC-C $@"
	$(Q)$(PROTOC_C) -Iproto --c_out=$(B)/proto ember/v1/guest.proto
	$(Q)touch $@
$(B)/proto/ember/v1/guest.pb-c.c $(B)/proto/ember/v1/guest.pb-c.h: $(B)/proto/.stamp-guest-c

$(B)/proto/%.pb-c.o: $(B)/proto/%.pb-c.c $(B)/proto/.stamp-c
	@echo "  CC       $@"
	$(Q)$(CC) $(ALL_CPPFLAGS) $(ALL_CFLAGS) $(GEN_WARNINGS) -c $< -o $@

# ---------------------------------------------------------------------------------------------
# sources

COMMON_SRCS := common/log.c common/fileio.c common/id.c common/error.c
STORAGE_SRCS := storage/storage.c storage/loop.c storage/registry.c storage/dm.c \
	storage/file.c storage/usage.c storage/reclaim.c
NETNS_SRCS := netns/cidr.c netns/ns.c netns/link.c netns/nft.c netns/pool.c netns/relay.c
FCCTL_SRCS := fcctl/api.c fcctl/process.c fcctl/proc.c fcctl/vsock.c
# ember-uffd: its own binary, not part of libfcctl.a (emberd only spawns it)
UFFD_SRCS := fcctl/uffd.c fcctl/uffd-ws.c fcctl/ember-uffd.c
FCSIM_SRCS := fcsim/main.c fcsim/api.c fcsim/vmm.c fcsim/guest.c fcsim/vsock.c fcsim/fclog.c \
	fcsim/memory.c fcsim/schema.c
AGENT_LIB_SRCS := agent/config.c agent/node.c agent/probe.c agent/rpc.c \
	agent/rpc-descriptors.c agent/rpc-health.c agent/rpc-reflection.c agent/record.c \
	agent/events.c agent/template.c agent/snapshot.c agent/sandbox.c agent/sandbox-ops.c agent/recover.c \
	agent/vmm.c agent/demo.c agent/node-sandbox.c agent/node-exec.c \
	agent/node-files.c agent/expiry.c agent/console.c agent/node-console.c agent/http.c \
	agent/rpc-local.c agent/metrics.c agent/pbjson.c agent/systemd.c agent/pull.c
AGENT_SRCS := agent/main.c $(AGENT_LIB_SRCS)
GUEST_INIT_SRCS := guest/init/ember-init.c guest/init/cmdline.c guest/init/net.c
GUEST_AGENT_SRCS := guest/agent/main.c guest/agent/conn.c guest/agent/exec.c guest/agent/file.c
GUEST_FRAME_SRCS := guest/proto/frame.c
GUEST_CLIENT_SRCS := guest/client/guest-client.c
GUEST_SRCS := $(GUEST_AGENT_SRCS) $(GUEST_FRAME_SRCS) $(GUEST_CLIENT_SRCS)

COMMON_OBJS := $(COMMON_SRCS:%.c=$(B)/obj/%.o)
STORAGE_OBJS := $(STORAGE_SRCS:%.c=$(B)/obj/%.o)
NETNS_OBJS := $(NETNS_SRCS:%.c=$(B)/obj/%.o)
FCCTL_OBJS := $(FCCTL_SRCS:%.c=$(B)/obj/%.o)
AGENT_LIB_OBJS := $(AGENT_LIB_SRCS:%.c=$(B)/obj/%.o)

ALL_SRCS := $(COMMON_SRCS) $(STORAGE_SRCS) $(NETNS_SRCS) $(FCCTL_SRCS) $(UFFD_SRCS) \
	$(FCSIM_SRCS) $(AGENT_SRCS) $(GUEST_SRCS) $(GUEST_INIT_SRCS)

# Lower modules may log at debug level only (common/log.h hides the other levels under
# LOG_DEBUG_ONLY): the agent decides what is logged, once (DESIGN.md §2).
LOWER_MODULES := common storage netns fcctl
$(foreach m,$(LOWER_MODULES),$(eval $(B)/obj/$(m)/%.o: MODULE_CPPFLAGS := -DLOG_DEBUG_ONLY))
# The guest client library is a lower module too (emberd's Exec will sit on it).
$(B)/obj/guest/%.o: MODULE_CPPFLAGS := -DLOG_DEBUG_ONLY

$(B)/obj/%.o: %.c $(B)/proto/.stamp-c
	@mkdir -p $(@D)
	@echo "  CC       $@"
	$(Q)$(CC) $(ALL_CPPFLAGS) $(MODULE_CPPFLAGS) $(ALL_CFLAGS) $(WARNINGS) -MMD -MP -c $< -o $@

$(B)/libcommon.a: $(COMMON_OBJS)
	@echo "  AR       $@"
	$(Q)rm -f $@ && $(AR) rcs $@ $^

$(B)/libstorage.a: $(STORAGE_OBJS)
	@echo "  AR       $@"
	$(Q)rm -f $@ && $(AR) rcs $@ $^

$(B)/libnetns.a: $(NETNS_OBJS)
	@echo "  AR       $@"
	$(Q)rm -f $@ && $(AR) rcs $@ $^

$(B)/libfcctl.a: $(FCCTL_OBJS)
	@echo "  AR       $@"
	$(Q)rm -f $@ && $(AR) rcs $@ $^

# The descriptor set is linked in as data (.incbin), so the binary carries its own API.
$(B)/obj/agent/descriptor-set.o: agent/descriptor-set.S $(B)/proto/ember.desc
	@mkdir -p $(@D)
	@echo "  AS       $@"
	$(Q)$(CC) $(ALL_CPPFLAGS) -DDESCRIPTOR_SET_FILE='"$(B)/proto/ember.desc"' -c $< -o $@
# So is the operator's page.
$(B)/obj/agent/test-page.o: agent/test-page.S agent/test-page.html
	@mkdir -p $(@D)
	@echo "  AS       $@"
	$(Q)$(CC) $(ALL_CPPFLAGS) -DTEST_PAGE_FILE='"agent/test-page.html"' -c $< -o $@

$(B)/fcsim: $(FCSIM_SRCS:%.c=$(B)/obj/%.o) $(B)/libnetns.a $(B)/libstorage.a $(B)/libcommon.a
	@echo "  LD       $@"
	$(Q)$(CC) $(ALL_LDFLAGS) $^ $(PKG_LIBS) -o $@

# ---------------------------------------------------------------------------------------------
# guest: ember-guest runs inside the microVM (fcsim's container in tests): static, and without
# sanitizers (the guest has none of their runtime), so its objects are built apart. The frame
# codec is shared with the host's client library (libguestclient.a).

GUEST_STATIC_FLAGS := -std=gnu11 -D_GNU_SOURCE -DEMBER_VERSION='"$(VERSION)"' -I. -I$(B)/proto \
	-fno-strict-aliasing -fstack-protector-strong -D_FORTIFY_SOURCE=2 $(CFLAGS)
GUEST_STATIC_OBJS := $(GUEST_AGENT_SRCS:%.c=$(B)/obj-guest/%.o) \
	$(GUEST_FRAME_SRCS:%.c=$(B)/obj-guest/%.o) $(B)/obj-guest/guest.pb-c.o \
	$(B)/obj-guest/common/fileio.o
GUEST_CLIENT_OBJS := $(GUEST_CLIENT_SRCS:%.c=$(B)/obj/%.o) $(GUEST_FRAME_SRCS:%.c=$(B)/obj/%.o) \
	$(B)/proto/ember/v1/guest.pb-c.o

$(B)/obj-guest/%.o: %.c $(B)/proto/.stamp-guest-c
	@mkdir -p $(@D)
	@echo "  CC       $@ (static)"
	$(Q)$(CC) $(GUEST_STATIC_FLAGS) $(WARNINGS) -MMD -MP -c $< -o $@
$(B)/obj-guest/guest.pb-c.o: $(B)/proto/ember/v1/guest.pb-c.c
	@mkdir -p $(@D)
	@echo "  CC       $@ (static)"
	$(Q)$(CC) $(GUEST_STATIC_FLAGS) $(GEN_WARNINGS) -c $< -o $@
$(B)/ember-guest: $(GUEST_STATIC_OBJS)
	@echo "  LD       $@ (static)"
	$(Q)$(CC) -static $(LDFLAGS) $^ -lprotobuf-c -o $@
# hostile-guest: a guest agent that misbehaves on request (test_exec.py)
$(B)/test/hostile-guest: $(B)/obj-guest/test/guest/hostile-guest.o \
		$(GUEST_FRAME_SRCS:%.c=$(B)/obj-guest/%.o) $(B)/obj-guest/guest.pb-c.o \
		$(B)/obj-guest/common/fileio.o
	@echo "  LD       $@ (static)"
	$(Q)$(CC) -static $(LDFLAGS) $^ -lprotobuf-c -o $@

$(GUEST_CLIENT_OBJS) $(B)/obj/test/unit/test-guest-frame.o $(AGENT_LIB_OBJS): $(B)/proto/.stamp-guest-c
$(B)/libguestclient.a: $(GUEST_CLIENT_OBJS)
	@echo "  AR       $@"
	$(Q)rm -f $@ && $(AR) rcs $@ $^

# ember-init: PID 1 of the microVM. Static, because the root image carries no libc of ours;
# libnl-route-3 from the static archives libnl-3-dev and libnl-route-3-dev ship. No sanitizers:
# the guest has none of their runtime. ld warns that libnl's name lookups (getaddrinfo,
# getprotobyname) need glibc's NSS modules at run time: ember-init never calls them, so those
# warnings are filtered out; anything else ld or the compiler says gets through.
NL_STATIC_CFLAGS = $(shell $(PKG_CONFIG) --cflags libnl-route-3.0 2>/dev/null)
NL_STATIC_LIBS = $(shell $(PKG_CONFIG) --static --libs libnl-route-3.0 2>/dev/null)
$(B)/ember-init: $(GUEST_INIT_SRCS) guest/init/init.h common/macro.h
	@mkdir -p $(@D)
	@echo "  CC       $@ (static)"
	$(Q)set -o pipefail; $(CC) -std=gnu11 -D_GNU_SOURCE -DEMBER_VERSION='"$(VERSION)"' -I. \
		$(NL_STATIC_CFLAGS) -O2 -g -fstack-protector-strong -D_FORTIFY_SOURCE=2 $(WARNINGS) \
		-static $(GUEST_INIT_SRCS) $(NL_STATIC_LIBS) -o $@ 2>&1 | \
		{ grep -v -e 'requires at runtime the shared libraries' -e ': in function `' || true; }

$(B)/emberd: $(B)/obj/agent/main.o $(AGENT_LIB_OBJS) $(B)/obj/agent/descriptor-set.o \
		$(B)/obj/agent/test-page.o $(PROTO_OBJS) \
		$(B)/libguestclient.a $(B)/libfcctl.a $(B)/libstorage.a \
		$(B)/libnetns.a $(B)/libcommon.a
	@echo "  LD       $@"
	$(Q)$(CC) $(ALL_LDFLAGS) $^ $(PKG_LIBS) -o $@

# emberd with crash points (agent/crash-point.h), for the crash-safety tests only: the one
# object that has them is built again with EMBER_TEST_HOOKS; emberd itself has none.
HOOK_SRCS := agent/sandbox-ops.c agent/pull.c
HOOK_OBJS := $(patsubst %.c,$(B)/obj-hooks/%.o,$(HOOK_SRCS)) $(B)/obj-hooks/agent/crash-point.o
$(B)/obj-hooks/%.o: %.c $(B)/proto/.stamp-c $(B)/proto/.stamp-guest-c
	@mkdir -p $(@D)
	@echo "  CC       $@ (test hooks)"
	$(Q)$(CC) $(ALL_CPPFLAGS) -DEMBER_TEST_HOOKS $(ALL_CFLAGS) $(WARNINGS) -MMD -MP -c $< -o $@
$(B)/test/emberd-hooks: $(B)/obj/agent/main.o \
		$(filter-out $(patsubst %.c,$(B)/obj/%.o,$(HOOK_SRCS)),$(AGENT_LIB_OBJS)) \
		$(HOOK_OBJS) $(B)/obj/agent/descriptor-set.o $(B)/obj/agent/test-page.o $(PROTO_OBJS) \
		$(B)/libguestclient.a $(B)/libfcctl.a $(B)/libstorage.a \
		$(B)/libnetns.a $(B)/libcommon.a
	@mkdir -p $(@D)
	@echo "  LD       $@"
	$(Q)$(CC) $(ALL_LDFLAGS) $^ $(PKG_LIBS) -o $@

# ember-uffd links only what it uses: one runs per resumed sandbox.
UFFD_OBJ := $(B)/obj/fcctl/uffd.o $(B)/obj/fcctl/uffd-ws.o $(B)/obj/fcctl/proc.o
UFFD_LIBS = $(shell $(PKG_CONFIG) --libs json-c libsystemd 2>/dev/null)
$(B)/ember-uffd: $(B)/obj/fcctl/ember-uffd.o $(UFFD_OBJ) $(B)/libcommon.a
	@echo "  LD       $@"
	$(Q)$(CC) $(ALL_LDFLAGS) $^ $(UFFD_LIBS) -o $@

# ---------------------------------------------------------------------------------------------
# tests

UNIT_TESTS := test-config test-id test-rpc-descriptors test-fileio test-storage test-netns \
	test-fcsim-schema test-fcsim-memory test-uffd test-guest-frame \
	test-init-cmdline test-expiry test-console
UNIT_BINS := $(UNIT_TESTS:%=$(B)/test/unit/%)

$(B)/obj/test/unit/%.o: test/unit/%.c $(B)/proto/.stamp-c
	@mkdir -p $(@D)
	@echo "  CC       $@"
	$(Q)$(CC) $(ALL_CPPFLAGS) $(CMOCKA_CFLAGS) $(ALL_CFLAGS) $(WARNINGS) -MMD -MP -c $< -o $@

$(B)/test/unit/test-config: $(B)/obj/test/unit/test-config.o $(B)/obj/agent/config.o $(B)/libnetns.a \
	$(B)/libcommon.a
$(B)/test/unit/test-id: $(B)/obj/test/unit/test-id.o $(B)/libcommon.a
$(B)/test/unit/test-fileio: $(B)/obj/test/unit/test-fileio.o $(B)/libcommon.a
$(B)/test/unit/test-storage: $(B)/obj/test/unit/test-storage.o $(B)/libstorage.a $(B)/libcommon.a
$(B)/test/unit/test-netns: $(B)/obj/test/unit/test-netns.o $(B)/libnetns.a $(B)/libcommon.a
$(B)/test/unit/test-uffd: $(B)/obj/test/unit/test-uffd.o $(UFFD_OBJ) $(B)/libcommon.a
$(B)/test/unit/test-fcsim-schema: $(B)/obj/test/unit/test-fcsim-schema.o $(B)/obj/fcsim/schema.o
$(B)/test/unit/test-init-cmdline: $(B)/obj/test/unit/test-init-cmdline.o \
	$(B)/obj/guest/init/cmdline.o
$(B)/test/unit/test-fcsim-memory: $(B)/obj/test/unit/test-fcsim-memory.o $(B)/obj/fcsim/memory.o \
	$(B)/libcommon.a
$(B)/test/unit/test-rpc-descriptors: $(B)/obj/test/unit/test-rpc-descriptors.o \
	$(B)/obj/agent/rpc-descriptors.o $(B)/obj/agent/descriptor-set.o \
	$(B)/proto/google/protobuf/descriptor.pb-c.o $(B)/libcommon.a
$(B)/test/unit/test-guest-frame: $(B)/obj/test/unit/test-guest-frame.o \
	$(GUEST_FRAME_SRCS:%.c=$(B)/obj/%.o) $(B)/proto/ember/v1/guest.pb-c.o
$(B)/test/unit/test-expiry: $(B)/obj/test/unit/test-expiry.o $(B)/obj/agent/expiry.o \
	$(B)/libcommon.a
$(B)/obj/test/unit/test-expiry.o: $(B)/proto/.stamp-guest-c
$(B)/test/unit/test-console: $(B)/obj/test/unit/test-console.o $(B)/obj/agent/console.o \
	$(B)/libcommon.a
$(B)/obj/test/unit/test-console.o: $(B)/proto/.stamp-guest-c
$(UNIT_BINS):
	@mkdir -p $(@D)
	@echo "  LD       $@"
	$(Q)$(CC) $(ALL_LDFLAGS) $^ $(CMOCKA_LIBS) $(PKG_LIBS) -o $@

unit-tests: $(UNIT_BINS)

# pbjson, the proto3 JSON transcoder (agent/pbjson.c). pbjson-tool runs it for test_pbjson.py,
# which holds it to python3-protobuf's json_format on the Node API's messages and on
# test/unit/pbjson_kinds.proto (every field kind; its C and Python go to $(B)/test/pbjson);
# fuzz-pbjson fuzzes it, check-pbjson-fuzz replays the seed corpus.
PBJSON_GEN := $(B)/test/pbjson
PBJSON_GEN_OBJS := $(PBJSON_GEN)/pbjson_kinds.pb-c.o $(PBJSON_GEN)/google/protobuf/empty.pb-c.o
$(PBJSON_GEN)/.stamp: test/unit/pbjson_kinds.proto
	@mkdir -p $(PBJSON_GEN)/py
	@echo "  PROTOC-C $(PBJSON_GEN)"
	$(Q)$(PROTOC_C) -Itest/unit -I$(PROTO_SYS) --c_out=$(PBJSON_GEN) pbjson_kinds.proto
	$(Q)$(PROTOC_C) -I$(PROTO_SYS) --c_out=$(PBJSON_GEN) google/protobuf/empty.proto
	$(Q)$(PROTOC) -Itest/unit -I$(PROTO_SYS) --python_out=$(PBJSON_GEN)/py pbjson_kinds.proto
	$(Q)touch $@
$(PBJSON_GEN)/%.pb-c.o: $(PBJSON_GEN)/.stamp $(B)/proto/.stamp-c
	@echo "  CC       $@"
	$(Q)$(CC) $(ALL_CPPFLAGS) -I$(PBJSON_GEN) $(ALL_CFLAGS) $(GEN_WARNINGS) \
		-c $(PBJSON_GEN)/$*.pb-c.c -o $@
$(B)/obj/test/unit/pbjson-tool.o: test/unit/pbjson-tool.c $(B)/proto/.stamp-c $(PBJSON_GEN)/.stamp
	@mkdir -p $(@D)
	@echo "  CC       $@"
	$(Q)$(CC) $(ALL_CPPFLAGS) -I$(PBJSON_GEN) $(ALL_CFLAGS) $(WARNINGS) -MMD -MP -c $< -o $@
$(B)/test/pbjson-tool: $(B)/obj/test/unit/pbjson-tool.o $(B)/obj/agent/pbjson.o \
		$(PBJSON_GEN_OBJS) $(PROTO_OBJS) $(B)/libcommon.a
	@mkdir -p $(@D)
	@echo "  LD       $@"
	$(Q)$(CC) $(ALL_LDFLAGS) $^ $(PKG_LIBS) -o $@
check-pbjson: $(B)/test/pbjson-tool pystubs $(PBJSON_GEN)/.stamp
	$(PYTEST_ENV) $(PYTHON) -m pytest -q -p no:cacheprovider test/unit/test_pbjson.py \
		$(PYTEST_ARGS)
# The libFuzzer target without libFuzzer, over its seed corpus; sanitizer reports on stderr.
$(B)/test/fuzz-pbjson-replay: test/fuzz/fuzz-pbjson.c $(B)/obj/agent/pbjson.o $(PBJSON_GEN_OBJS) \
		$(PROTO_OBJS) $(B)/libcommon.a
	@mkdir -p $(@D)
	@echo "  CC       $@"
	$(Q)$(CC) $(ALL_CPPFLAGS) -I$(PBJSON_GEN) -DFUZZ_REPLAY_MAIN $(ALL_CFLAGS) $(WARNINGS) $^ \
		$(ALL_LDFLAGS) $(PKG_LIBS) -o $@
check-pbjson-fuzz: $(B)/test/fuzz-pbjson-replay
	@echo "  FUZZ     replay test/fuzz/corpus/pbjson"
	$(Q)$(B)/test/fuzz-pbjson-replay test/fuzz/corpus/pbjson/*
fuzz-pbjson: $(B)/proto/.stamp-c $(PBJSON_GEN)/.stamp
	@mkdir -p $(B)/fuzz/pbjson
	clang -g -O1 -fsanitize=fuzzer,address,undefined -D_GNU_SOURCE -I. -I$(B)/proto \
		-I$(PBJSON_GEN) agent/pbjson.c common/log.c common/error.c test/fuzz/fuzz-pbjson.c \
		$(filter %/node.pb-c.c %/timestamp.pb-c.c %/duration.pb-c.c %/field_mask.pb-c.c,$(PROTO_C)) \
		$(PBJSON_GEN)/pbjson_kinds.pb-c.c $(PBJSON_GEN)/google/protobuf/empty.pb-c.c \
		$$($(PKG_CONFIG) --cflags --libs json-c libprotobuf-c libcrypto libsystemd) \
		-o $(B)/fuzz-pbjson
	$(B)/fuzz-pbjson -runs=$(FUZZ_RUNS) $(B)/fuzz/pbjson test/fuzz/corpus/pbjson
.PHONY: check-pbjson check-pbjson-fuzz fuzz-pbjson

# rpctestd: the gRPC layer with a test service whose handlers block, stream and report what
# they saw, so that back-pressure, deadlines, cancellation and drain can be tested for real.
$(B)/test/proto/.stamp-c: test/rpc/rpctest.proto
	@mkdir -p $(@D)
	@echo "  PROTOC-C $@"
	$(Q)$(PROTOC_C) -Itest/rpc --c_out=$(B)/test/proto rpctest.proto
	$(Q)touch $@
$(B)/test/proto/rpctest.pb-c.c: $(B)/test/proto/.stamp-c
$(B)/test/proto/rpctest.desc: test/rpc/rpctest.proto
	@mkdir -p $(@D)
	$(Q)$(PROTOC) -Itest/rpc -I$(PROTO_SYS) -I$(GRPC_PROTO) --include_imports \
		--descriptor_set_out=$@ rpctest.proto $(GRPC_PROTOS)
$(B)/test/proto/rpctest.pb-c.o: $(B)/test/proto/rpctest.pb-c.c
	$(Q)$(CC) $(ALL_CPPFLAGS) $(ALL_CFLAGS) $(GEN_WARNINGS) -I$(B)/test/proto -c $< -o $@
$(B)/obj/test/rpc/rpctestd.o: test/rpc/rpctestd.c $(B)/test/proto/.stamp-c $(B)/proto/.stamp-c
	@mkdir -p $(@D)
	@echo "  CC       $@"
	$(Q)$(CC) $(ALL_CPPFLAGS) -I$(B)/test/proto $(ALL_CFLAGS) $(WARNINGS) -MMD -MP -c $< -o $@
$(B)/obj/test/rpc/descriptor-set.o: agent/descriptor-set.S $(B)/test/proto/rpctest.desc
	@mkdir -p $(@D)
	$(Q)$(CC) $(ALL_CPPFLAGS) -DDESCRIPTOR_SET_FILE='"$(B)/test/proto/rpctest.desc"' -c $< -o $@
$(B)/test/rpctestd: $(B)/obj/test/rpc/rpctestd.o $(B)/test/proto/rpctest.pb-c.o \
		$(B)/obj/test/rpc/descriptor-set.o $(filter $(B)/obj/agent/rpc%,$(AGENT_LIB_OBJS)) \
		$(B)/obj/agent/metrics.o $(B)/obj/agent/http.o $(B)/obj/agent/pbjson.o \
		$(B)/obj/agent/test-page.o \
		$(filter-out $(B)/proto/ember/%,$(PROTO_OBJS)) $(B)/libcommon.a
	@echo "  LD       $@"
	$(Q)$(CC) $(ALL_LDFLAGS) $^ $(PKG_LIBS) -o $@

# Benchmark client: plain gRPC core, so the figures measure the server, not a client runtime.
$(B)/test/rpc-bench: test/bench/rpc-bench.c $(B)/proto/.stamp-c $(PROTO_OBJS)
	@mkdir -p $(@D)
	@echo "  CC       $@"
	$(Q)$(CC) $(ALL_CPPFLAGS) $(ALL_CFLAGS) $(WARNINGS) $< $(PROTO_OBJS) $(ALL_LDFLAGS) \
		$(PKG_LIBS) -lm -o $@

$(B)/test/exec-bench: test/bench/exec-bench.c $(B)/proto/.stamp-c $(PROTO_OBJS)
	@mkdir -p $(@D)
	@echo "  CC       $@"
	$(Q)$(CC) $(ALL_CPPFLAGS) $(ALL_CFLAGS) $(WARNINGS) $< $(PROTO_OBJS) $(ALL_LDFLAGS) \
		$(PKG_LIBS) -o $@

$(B)/obj/test/storage/%.o: test/storage/%.c
	@mkdir -p $(@D)
	@echo "  CC       $@"
	$(Q)$(CC) $(ALL_CPPFLAGS) $(ALL_CFLAGS) $(WARNINGS) -MMD -MP -c $< -o $@
$(B)/test/storage-tool: $(B)/obj/test/storage/storage-tool.o $(B)/libstorage.a $(B)/libcommon.a
	@echo "  LD       $@"
	$(Q)$(CC) $(ALL_LDFLAGS) $^ $(PKG_LIBS) -o $@

$(B)/obj/test/net/%.o: test/net/%.c
	@mkdir -p $(@D)
	@echo "  CC       $@"
	$(Q)$(CC) $(ALL_CPPFLAGS) $(ALL_CFLAGS) $(WARNINGS) -MMD -MP -c $< -o $@
$(B)/test/netns-tool: $(B)/obj/test/net/netns-tool.o $(B)/libnetns.a $(B)/libcommon.a
	@echo "  LD       $@"
	$(Q)$(CC) $(ALL_LDFLAGS) $^ $(PKG_LIBS) -o $@
$(B)/test/guest-standin: $(B)/obj/test/net/guest-standin.o $(B)/libnetns.a $(B)/libcommon.a
	@echo "  LD       $@"
	$(Q)$(CC) $(ALL_LDFLAGS) $^ $(PKG_LIBS) -o $@

# Runs inside fcsim test guests (busybox root images): static, no sanitizers (the guest has
# none of their runtime).
$(B)/test/guest-helper: test/fcsim/guest-helper.c
	@mkdir -p $(@D)
	@echo "  CC       $@ (static)"
	$(Q)$(CC) -std=gnu11 -D_GNU_SOURCE -O2 $(WARNINGS) -static $< -o $@

$(B)/obj/test/fcctl/%.o: test/fcctl/%.c
	@mkdir -p $(@D)
	@echo "  CC       $@"
	$(Q)$(CC) $(ALL_CPPFLAGS) $(ALL_CFLAGS) $(WARNINGS) -MMD -MP -c $< -o $@
$(B)/test/fcctl-tool: $(B)/obj/test/fcctl/fcctl-tool.o $(B)/libfcctl.a $(B)/libcommon.a
	@echo "  LD       $@"
	$(Q)$(CC) $(ALL_LDFLAGS) $^ $(PKG_LIBS) -o $@

$(B)/obj/test/guest/%.o: test/guest/%.c $(B)/proto/.stamp-guest-c
	@mkdir -p $(@D)
	@echo "  CC       $@"
	$(Q)$(CC) $(ALL_CPPFLAGS) $(ALL_CFLAGS) $(WARNINGS) -MMD -MP -c $< -o $@
$(B)/test/guest-tool: $(B)/obj/test/guest/guest-tool.o $(B)/libguestclient.a $(B)/libfcctl.a \
		$(B)/libcommon.a
	@mkdir -p $(@D)
	@echo "  LD       $@"
	$(Q)$(CC) $(ALL_LDFLAGS) $^ $(PKG_LIBS) -o $@

# Python stubs for the integration tests. health/reflection are generated from inside the
# grpc-proto tree so that no top-level "grpc" package shadows grpcio.
$(B)/py/.stamp: proto/ember/v1/node.proto test/rpc/rpctest.proto
	@mkdir -p $(B)/py
	@echo "  PROTOC   $(B)/py"
	$(Q)$(PROTOC) -Iproto -I$(PROTO_SYS) --python_out=$(B)/py --grpc_python_out=$(B)/py \
		--plugin=protoc-gen-grpc_python=/usr/bin/grpc_python_plugin $(EMBER_PROTOS)
	$(Q)$(PROTOC) -I$(GRPC_PROTO)/grpc --python_out=$(B)/py --grpc_python_out=$(B)/py \
		--plugin=protoc-gen-grpc_python=/usr/bin/grpc_python_plugin \
		health/v1/health.proto reflection/v1/reflection.proto \
		reflection/v1alpha/reflection.proto
	$(Q)$(PROTOC) -Itest/rpc --python_out=$(B)/py --grpc_python_out=$(B)/py \
		--plugin=protoc-gen-grpc_python=/usr/bin/grpc_python_plugin rpctest.proto
	$(Q)touch $@
pystubs: $(B)/py/.stamp

UNIT_ENV := EMBER_SRCDIR=$(CURDIR)
PYTEST_ENV := EMBER_BUILD=$(CURDIR)/$(B) EMBER_SRCDIR=$(CURDIR) EMBER_SANITIZE=$(SANITIZE) \
	ASAN_OPTIONS=detect_leaks=1:abort_on_error=0:log_path=$(CURDIR)/$(B)/asan \
	UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1:log_path=$(CURDIR)/$(B)/ubsan \
	LSAN_OPTIONS=print_suppressions=0
PYTEST_ARGS ?=

# check-deploy only for the plain build: the packages are built without sanitizers anyway.
check: deps
	$(Q)$(MAKE) --no-print-directory all
	$(Q)$(MAKE) --no-print-directory check-unit check-integration check-vm \
		$(if $(filter 1,$(SANITIZE)),,check-deploy)

check-unit: unit-tests $(B)/test/fuzz-uffd-handshake-replay
	@set -e; for t in $(UNIT_BINS); do echo "  UNIT     $$t"; \
		$(PYTEST_ENV) $(UNIT_ENV) $$t; done
	@echo "  FUZZ     replay test/fuzz/corpus/uffd-handshake"
	$(Q)$(PYTEST_ENV) $(B)/test/fuzz-uffd-handshake-replay test/fuzz/corpus/uffd-handshake/*
	$(Q)$(MAKE) --no-print-directory check-pbjson check-pbjson-fuzz

# PYTEST_JOBS workers (pytest-xdist), each taking whole files (--dist loadfile: a module's
# tests and fixtures stay on one worker). The tests mostly wait on guests and daemons, so two
# workers halve the time on two cores (ASan+UBSan too: 890 s instead of about 1450 s here, the
# CPUs 66 % busy). PYTEST_JOBS=1: one process.
PYTEST_JOBS ?= 2
check-integration: all
	@rm -f $(B)/asan.* $(B)/ubsan.*
	$(PYTEST_ENV) $(PYTHON) -m pytest -q -p no:cacheprovider \
		$(if $(filter-out 1,$(PYTEST_JOBS)),-n $(PYTEST_JOBS) --dist loadfile) \
		test/integration $(PYTEST_ARGS)
	@if ls $(B)/asan.* $(B)/ubsan.* >/dev/null 2>&1; then \
		echo "sanitizer reports:"; cat $(B)/asan.* $(B)/ubsan.* 2>/dev/null; exit 1; fi

# The deployment test: the packages (make deb) installed with apt-get and run by systemd as
# PID 1, in one VM boot (test/vm/run --systemd): the unit, sandbox scopes and machined, restarts,
# crash and watchdog, the journal, a bad configuration, remove and purge.
check-deploy: deb
	$(PYTEST_ENV) test/vm/run --systemd --timeout 1500 -- \
		$(PYTHON) -m pytest -q -p no:cacheprovider --color=no test/vm/systemd $(PYTEST_ARGS)

# VM-only tests (device-mapper; systemd is check-deploy's): one boot for all of them. emberd's network
# slots need veth, tun and nftables with NAT in the VM's kernel.
VM_MODULES := loop,dm-mod,dm-snapshot,ext4,veth,tun,nf_tables,nft_chain_nat,nft_nat,nft_ct,nft_masq
# 4 GiB: test_emberd_dm.py runs 20 forks of a 128 MiB guest, whose memory ember-uffd fills.
check-vm: all
	@rm -f $(B)/asan.* $(B)/ubsan.*
	$(PYTEST_ENV) test/vm/run --timeout 1200 --mem 4096 --modules $(VM_MODULES) -- \
		$(PYTHON) -m pytest -q -p no:cacheprovider \
		--color=no --ignore=test/vm/systemd test/vm $(PYTEST_ARGS)
	@if ls $(B)/asan.* $(B)/ubsan.* >/dev/null 2>&1; then \
		echo "sanitizer reports:"; cat $(B)/asan.* $(B)/ubsan.* 2>/dev/null; exit 1; fi

# The libFuzzer target, replayed over its seed corpus without libFuzzer (check-unit).
$(B)/test/fuzz-uffd-handshake-replay: test/fuzz/fuzz-uffd-handshake.c $(UFFD_OBJ) $(B)/libcommon.a
	@mkdir -p $(@D)
	@echo "  CC       $@"
	$(Q)$(CC) $(ALL_CPPFLAGS) -DFUZZ_REPLAY_MAIN $(ALL_CFLAGS) $(WARNINGS) $^ $(ALL_LDFLAGS) \
		$(UFFD_LIBS) -o $@

# Real fuzzing (clang + libFuzzer): new inputs go to $(B)/fuzz/, the seed corpus stays as is.
FUZZ_RUNS ?= 200000
fuzz-uffd:
	@mkdir -p $(B)/fuzz/uffd-handshake
	clang -g -O1 -fsanitize=fuzzer,address,undefined -D_GNU_SOURCE -I. \
		fcctl/uffd.c fcctl/uffd-ws.c fcctl/proc.c common/log.c common/error.c \
		common/fileio.c test/fuzz/fuzz-uffd-handshake.c \
		$$($(PKG_CONFIG) --cflags --libs json-c libsystemd) -o $(B)/fuzz-uffd-handshake
	$(B)/fuzz-uffd-handshake -runs=$(FUZZ_RUNS) $(B)/fuzz/uffd-handshake \
		test/fuzz/corpus/uffd-handshake

$(B)/test/bench-uffd: test/bench/bench-uffd.c $(UFFD_OBJ) $(B)/libcommon.a
	@mkdir -p $(@D)
	@echo "  CC       $@"
	$(Q)$(CC) $(ALL_CPPFLAGS) $(ALL_CFLAGS) $(WARNINGS) $^ $(ALL_LDFLAGS) $(UFFD_LIBS) -o $@

BENCH_UFFD_ARGS ?=
bench-uffd: $(B)/test/bench-uffd
	$(B)/test/bench-uffd $(BENCH_UFFD_ARGS)

bench-storage: all
	$(Q)test/vm/run -- test/bench/bench-storage.sh $(B) dm
	$(Q)test/bench/bench-storage.sh $(B) file

bench-net: all
	$(Q)test/bench/bench-net.sh $(B)

bench-rpc: all
	$(PYTHON) test/bench/bench-rpc.py --build $(B)

bench-exec: all
	$(PYTHON) test/bench/bench-exec.py --build $(B)

# PullTemplate of a 1 GiB file from a loopback server against `curl -o` of it, same run.
bench-pull: all
	$(PYTHON) test/bench/bench-pull.py --build $(B) $(BENCH_ARGS)

# emberd's create/destroy against the same sequence driven through the libraries directly.
$(B)/test/lifecycle-direct: $(B)/obj/test/bench/lifecycle-direct.o $(B)/libguestclient.a \
		$(B)/libfcctl.a $(B)/libstorage.a $(B)/libnetns.a $(B)/libcommon.a
	@echo "  LD       $@"
	$(Q)$(CC) $(ALL_LDFLAGS) $^ $(PKG_LIBS) -o $@
$(B)/obj/test/bench/lifecycle-direct.o: $(B)/proto/.stamp-guest-c
bench-lifecycle: all
	$(PYTHON) test/bench/bench-lifecycle.py --build $(B)
# pause and resume by step, create from a snapshot against a cold create, 20 forks at once.
# On the host (fcsim, file backend), then the 20 forks again in the VM over device-mapper, the
# backend whose fork disk is a fresh snapshot CoW.
bench-pause: all
	$(PYTHON) test/bench/bench-pause.py --build $(B) $(BENCH_ARGS)
	test/vm/run --mem 4096 --modules $(VM_MODULES) -- \
		$(PYTHON) test/bench/bench-pause.py --build $(B) --forks-only

# emberd and what it runs: fcsim (no KVM here), and the guest binaries and ember-mkrootfs for the
# demo template.
run: deps
	$(Q)$(MAKE) --no-print-directory $(B)/emberd $(B)/fcsim $(B)/ember-uffd $(B)/ember-init \
		$(B)/ember-guest
	exec $(B)/emberd

# ---------------------------------------------------------------------------------------------
# dependencies: Debian packages, installed only when something is missing

DEB_PKGS := build-essential pkg-config libgrpc-dev libprotobuf-c-dev protobuf-c-compiler \
	protobuf-compiler protobuf-compiler-grpc libprotobuf-dev grpc-proto libinih-dev \
	libsystemd-dev libcmocka-dev libdevmapper-dev libnl-3-dev libnl-route-3-dev \
	libnftables-dev libjson-c-dev libmicrohttpd-dev libcurl4-openssl-dev nftables iproute2 python3 python3-yaml python3-grpcio python3-protobuf \
	python3-pytest openssl clang-format clang-tidy cppcheck \
	qemu-system-x86 linux-image-amd64 busybox-static kmod udev dmsetup e2fsprogs xfsprogs \
	util-linux procps chromium chromium-driver python3-selenium python3-prometheus-client \
	libssl-dev debhelper dpkg-dev fakeroot lintian python3-pytest-xdist dbus systemd-container

deps:
	@missing=$$(for p in $(DEB_PKGS); do \
		dpkg-query -W -f='$${db:Status-Status}\n' $$p 2>/dev/null | grep -qx installed \
			|| echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "  DEPS     installing:" $$missing; \
		if [ "$$(id -u)" != 0 ]; then echo "make deps: run as root to install" $$missing >&2; exit 1; fi; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get update -q && apt-get install -y -q --no-install-recommends $$missing; \
	fi

# ---------------------------------------------------------------------------------------------
# lint

LINT_SRCS := $(ALL_SRCS) $(wildcard common/*.h agent/*.h storage/*.h netns/*.h fcsim/*.h \
	fcctl/*.h guest/*/*.h test/guest/*.c test/unit/*.c test/fuzz/*.c \
	test/rpc/*.c test/bench/*.c test/storage/*.c test/net/*.c test/fcsim/*.c test/fcctl/*.c)
TIDY_SRCS := $(ALL_SRCS) test/rpc/rpctestd.c test/bench/rpc-bench.c test/bench/exec-bench.c test/storage/storage-tool.c \
	test/fcsim/guest-helper.c test/fcctl/fcctl-tool.c test/bench/bench-uffd.c \
	test/bench/lifecycle-direct.c \
	test/net/netns-tool.c test/net/guest-standin.c test/guest/guest-tool.c \
	test/guest/hostile-guest.c

lint: $(B)/proto/.stamp-c $(B)/proto/.stamp-guest-c $(B)/test/proto/.stamp-c
	@echo "  LAYERS   (lower modules include neither agent/ nor generated headers)"
	$(Q)bad=$$(grep -nE '#include "(agent/|.*\.pb-c\.h)' $(wildcard $(addsuffix /*.[ch],$(LOWER_MODULES))) || true); \
		if [ -n "$$bad" ]; then echo "$$bad"; exit 1; fi
	@echo "  FORMAT   (clang-format --dry-run)"
	$(Q)clang-format --dry-run --Werror $(LINT_SRCS)
	@echo "  TIDY"
	@# One clang-tidy per CPU, a file each: the files are independent, and one process for
	@# all of them took most of lint's 3 minutes here. xargs exits 123 when any one failed.
	$(Q)printf '%s\n' $(TIDY_SRCS) | xargs -P $$(nproc) -I{} clang-tidy --quiet {} -- \
		$(BASE_CPPFLAGS) -I$(B)/test/proto $(PKG_CFLAGS) -std=gnu11 2>&1 | \
		{ grep -v "warnings\? generated" || true; }; exit $${PIPESTATUS[1]}
	@echo "  CPPCHECK"
	@# memleak/resourceLeak: cppcheck does not model __attribute__((cleanup)); leaks are
	@# checked at run time by LeakSanitizer (make SANITIZE=1 check).
	$(Q)cppcheck --quiet --error-exitcode=1 --enable=warning,performance,portability \
		--inline-suppr --std=c11 -D_GNU_SOURCE -I. --suppress=missingIncludeSystem \
		--suppress=memleak --suppress=resourceLeak \
		$(ALL_SRCS) test/rpc/rpctestd.c test/storage/storage-tool.c test/net/netns-tool.c \
		test/net/guest-standin.c test/fcctl/fcctl-tool.c test/bench/bench-uffd.c \
		test/bench/lifecycle-direct.c \
		test/fuzz/fuzz-uffd-handshake.c test/guest/guest-tool.c test/guest/hostile-guest.c

format:
	clang-format -i $(LINT_SRCS)

# ---------------------------------------------------------------------------------------------

# Manual pages (man/*.[1-8], ember.conf.5 generated from the annotated ember.conf) and the
# journal catalog (debian/ember.catalog) go with the rest; fcsim goes with ember-uffd, where
# emberd looks for its helpers (../lib/ember from its own directory).
install: MANDIR ?= $(PREFIX)/share/man
install: CATALOGDIR ?= $(PREFIX)/lib/systemd/catalog
install: $(B)/emberd $(B)/ember-uffd $(B)/ember-init $(B)/ember-guest $(B)/fcsim
	install -d $(DESTDIR)$(SBINDIR) $(DESTDIR)$(SYSCONFDIR)/ember $(DESTDIR)$(SYSTEMDUNITDIR) \
		$(DESTDIR)$(DOCDIR) $(DESTDIR)$(BINDIR) $(DESTDIR)$(LIBEXECDIR) $(DESTDIR)$(GUESTDIR) \
		$(DESTDIR)$(MANDIR)/man1 $(DESTDIR)$(MANDIR)/man5 $(DESTDIR)$(MANDIR)/man8
	install -m 0755 $(B)/emberd $(DESTDIR)$(SBINDIR)/emberd
	install -m 0755 $(B)/ember-uffd $(DESTDIR)$(LIBEXECDIR)/ember-uffd
	install -m 0755 $(B)/fcsim $(DESTDIR)$(LIBEXECDIR)/fcsim
	install -m 0755 $(B)/ember-init $(DESTDIR)$(GUESTDIR)/ember-init
	install -m 0755 $(B)/ember-guest $(DESTDIR)$(GUESTDIR)/ember-guest
	sed 's|@GUESTDIR@|$(GUESTDIR)|g' guest/mkrootfs > $(DESTDIR)$(BINDIR)/ember-mkrootfs
	chmod 0755 $(DESTDIR)$(BINDIR)/ember-mkrootfs
	install -m 0644 ember.conf $(DESTDIR)$(DOCDIR)/ember.conf.example
	install -m 0644 README.md $(DESTDIR)$(DOCDIR)/README.md
	[ -e $(DESTDIR)$(SYSCONFDIR)/ember/ember.conf ] || \
		install -m 0644 ember.conf $(DESTDIR)$(SYSCONFDIR)/ember/ember.conf
	sed 's|@SBINDIR@|$(SBINDIR)|g' debian/emberd.service.in \
		> $(DESTDIR)$(SYSTEMDUNITDIR)/emberd.service
	chmod 0644 $(DESTDIR)$(SYSTEMDUNITDIR)/emberd.service
	for m in man/*.[1-8]; do \
		sed 's|@VERSION@|$(VERSION)|g' $$m > $(DESTDIR)$(MANDIR)/man$${m##*.}/$${m##*/} && \
		chmod 0644 $(DESTDIR)$(MANDIR)/man$${m##*.}/$${m##*/} || exit 1; done
	$(PYTHON) man/ember-conf2man man/ember.conf.5.in ember.conf $(VERSION) \
		> $(DESTDIR)$(MANDIR)/man5/ember.conf.5
	chmod 0644 $(DESTDIR)$(MANDIR)/man5/ember.conf.5
	[ ! -e debian/ember.catalog ] || \
		install -D -m 0644 debian/ember.catalog $(DESTDIR)$(CATALOGDIR)/ember.catalog

# The Debian packages (debian/): ember, ember-guest, ember-fcsim. dpkg-buildpackage runs on a
# copy of the source (the files git knows, as they are in the working tree, plus new ones it
# does not ignore) in build/deb/src, so that its clean never touches this tree or build/; the
# .debs, .changes and .buildinfo land in build/deb/, and lintian must find no error or warning.
deb lint-deb: DEB_DIR := build/deb
deb: deps
	$(Q)rm -rf $(DEB_DIR) && mkdir -p $(DEB_DIR)/src
	@echo "  COPY     $(DEB_DIR)/src"
	$(Q)set -o pipefail; if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then \
		git ls-files -z --cached --others --exclude-standard | \
		while IFS= read -r -d '' f; do \
			if [ -e "$$f" ] || [ -L "$$f" ]; then printf '%s\0' "$$f"; fi; done | \
		tar --null --no-recursion -T - -cf - | tar -xf - -C $(DEB_DIR)/src; \
	else \
		tar --exclude=./build --exclude=./.git -cf - . | tar -xf - -C $(DEB_DIR)/src; \
	fi
	@echo "  DPKG     $(DEB_DIR)"
	$(Q)cd $(DEB_DIR)/src && DEB_BUILD_OPTIONS="parallel=$$(nproc) $(DEB_BUILD_OPTIONS)" \
		dpkg-buildpackage -us -uc > ../build.log 2>&1 || \
		{ tail -n 50 ../build.log; echo "make deb: dpkg-buildpackage failed (all of it in $(DEB_DIR)/build.log)" >&2; exit 1; }
	$(Q)ls $(DEB_DIR)/*.deb
	$(Q)$(MAKE) --no-print-directory lint-deb

# lintian over what `make deb` built: source and binary packages; info tags are shown, errors
# and warnings fail (each override in debian/*lintian-overrides says why it is one).
lint-deb:
	@echo "  LINTIAN  $(DEB_DIR)/*.changes"
	$(Q)lintian --display-info --fail-on error,warning $(DEB_DIR)/*.changes

clean:
	rm -rf build

.PHONY: bench-exec bench-lifecycle bench-pause
.PHONY: deb lint-deb check-deploy
.PHONY: all deps run check check-unit check-integration check-vm unit-tests pystubs lint \
	format install clean bench-rpc bench-storage bench-net bench-uffd bench-pull fuzz-uffd
.DELETE_ON_ERROR:

# Only files: a VM job's directory (build/vm/job-*/…/foo.service.d) is no dependency list.
-include $(shell find $(B) -name '*.d' -type f -not -path '$(B)/vm/*' 2>/dev/null)
