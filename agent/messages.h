/* SPDX-License-Identifier: Apache-2.0 */
/*
 * MESSAGE_ID= values for the journal: one fixed id per kind of event, so that operators can
 * select them (`journalctl MESSAGE_ID=…`) whatever the wording. Never reuse or change an id.
 */
#pragma once

/* serving, with listeners */
#define EMBER_MESSAGE_STARTED "edaa5f22028d4a81874c6db7decd64cb"
/* shutdown requested */
#define EMBER_MESSAGE_DRAINING "8c9b4757975744b1a0b5730f59abfa6d"
/* exited cleanly */
#define EMBER_MESSAGE_STOPPED "84f51d93d68c48cbbd08cef748e8ff12"
/* a sandbox RUNNING */
#define EMBER_MESSAGE_SANDBOX_CREATED "89721076b2164b6c82f2f42bb83281ee"
/* a sandbox gone */
#define EMBER_MESSAGE_SANDBOX_DESTROYED "df3ed2ea9f6b4fb29eedca97563af45d"
/* a sandbox FAILED */
#define EMBER_MESSAGE_SANDBOX_FAILED "e0afd0d06f14487a9a04c9eed794cf4c"
/* a sandbox PAUSED */
#define EMBER_MESSAGE_SANDBOX_PAUSED "bf17aa0ea5a946be893eacd0c2337e75"
/* RUNNING again */
#define EMBER_MESSAGE_SANDBOX_RESUMED "013d4e72f59741949f6198982ffca512"
/* start-up adoption */
#define EMBER_MESSAGE_RECOVERED "7a7fb09a1f2a48a8aec2de92db2fd295"
/* a step of an operation done */
#define EMBER_MESSAGE_SANDBOX_STEP "0d2edab04c5d41b2969da384a0c550af"
/* a step failed */
#define EMBER_MESSAGE_SANDBOX_STEP_FAILED "279a6c7d781045478bebbb6668a69876"
/* a create undone */
#define EMBER_MESSAGE_SANDBOX_CREATE_FAILED "f3e092ebdad5410aa1b00e8df389b50e"
/* destroy failed */
#define EMBER_MESSAGE_SANDBOX_DESTROY_FAILED "2c5d29cea050459e94b76c4ee5eccde0"
/* pause failed, runs on */
#define EMBER_MESSAGE_SANDBOX_PAUSE_FAILED "1c3057aa895540deb62fc7fc58e727f7"
/* resume failed, PAUSED */
#define EMBER_MESSAGE_SANDBOX_RESUME_FAILED "cfea40943e894204927fd105318709f0"
/* a snapshot taken of it */
#define EMBER_MESSAGE_SANDBOX_SNAPSHOT "940b01ea208645f1a9b91a1b03cb6fb6"
/* snapshot failed */
#define EMBER_MESSAGE_SANDBOX_SNAPSHOT_FAILED "96d7885f6cc04b22b7163e08b2fe9e0d"
/* its end time passed */
#define EMBER_MESSAGE_SANDBOX_EXPIRED "40e07be74b4740ba8ebf5949f254aa8b"
/* taken over at start-up */
#define EMBER_MESSAGE_SANDBOX_ADOPTED "afc9c74e91364a12a64f9204e90250d1"
/* UpdateSandbox changed it */
#define EMBER_MESSAGE_SANDBOX_UPDATED "f4b2183466914da9a3cf6ec7cae76db4"
/* a template READY */
#define EMBER_MESSAGE_TEMPLATE_REGISTERED "22e536afd82e48709dbfaa7d07de3dc1"
/* a pull began (or resumed) */
#define EMBER_MESSAGE_TEMPLATE_PULL_STARTED "935d5793af9f40189f60548f914c2a60"
/* a pull READY */
#define EMBER_MESSAGE_TEMPLATE_PULLED "f1b5304e6f0d41cb8bf8131a645beb6c"
/* a pull FAILED */
#define EMBER_MESSAGE_TEMPLATE_PULL_FAILED "185bd254c62e48eeb96a0b1f6aeba3e4"
/* a template removed */
#define EMBER_MESSAGE_TEMPLATE_DELETED "cab491fb36be4b0ab0e0c8693de9188b"
/* a snapshot removed */
#define EMBER_MESSAGE_SNAPSHOT_DELETED "eb489f3269ee436387db1f27383a1b36"
