/* SPDX-License-Identifier: Apache-2.0 */
/*
 * MESSAGE_ID= values for the journal: one fixed id per kind of event, so that operators can
 * select them (`journalctl MESSAGE_ID=…`) whatever the wording. Never reuse or change an id.
 */
#pragma once

#define EMBER_MESSAGE_STARTED           "edaa5f22028d4a81874c6db7decd64cb" /* serving, with listeners */
#define EMBER_MESSAGE_DRAINING          "8c9b4757975744b1a0b5730f59abfa6d" /* shutdown requested */
#define EMBER_MESSAGE_STOPPED           "84f51d93d68c48cbbd08cef748e8ff12" /* exited cleanly */
#define EMBER_MESSAGE_SANDBOX_CREATED   "89721076b2164b6c82f2f42bb83281ee" /* a sandbox RUNNING */
#define EMBER_MESSAGE_SANDBOX_DESTROYED "df3ed2ea9f6b4fb29eedca97563af45d" /* a sandbox gone */
#define EMBER_MESSAGE_SANDBOX_FAILED    "e0afd0d06f14487a9a04c9eed794cf4c" /* a sandbox FAILED */
#define EMBER_MESSAGE_SANDBOX_PAUSED    "bf17aa0ea5a946be893eacd0c2337e75" /* a sandbox PAUSED */
#define EMBER_MESSAGE_SANDBOX_RESUMED   "013d4e72f59741949f6198982ffca512" /* RUNNING again */
#define EMBER_MESSAGE_RECOVERED         "7a7fb09a1f2a48a8aec2de92db2fd295" /* start-up adoption */
