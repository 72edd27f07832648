/* SPDX-License-Identifier: Apache-2.0 */
/*
 * MESSAGE_ID= values for the journal: one fixed id per kind of event, so that operators can
 * select them (`journalctl MESSAGE_ID=…`) whatever the wording. Never reuse or change an id.
 */
#pragma once

#define EMBER_MESSAGE_STARTED  "edaa5f22028d4a81874c6db7decd64cb" /* serving, with listeners */
#define EMBER_MESSAGE_DRAINING "8c9b4757975744b1a0b5730f59abfa6d" /* shutdown requested */
#define EMBER_MESSAGE_STOPPED  "84f51d93d68c48cbbd08cef748e8ff12" /* exited cleanly */
