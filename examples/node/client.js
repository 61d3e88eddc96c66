#!/usr/bin/env node
// A weightshare client in Node.js, to show that the gRPC contract (protos/weightshare/v1) is usable from
// a language other than Python. It loads the .proto files at run time (no generated code), then:
//   1. WeightExportService: GetModelInfo, AttachTrainer (read-only), GetLayout, StreamHandles,
//      GetExportStatus;
//   2. TrainerService: SubmitExamples, then GetTrainingStatus until they are trained;
//   3. a deliberately invalid SubmitExamples, to show how errors arrive (status code + details);
//   4. DetachTrainer.
// Each result is one JSON line on stdout. Exit 0 on success; otherwise one line on stderr and exit 1.
//
//   node client.js --inference unix:///tmp/ws/inference.sock --trainer unix:///tmp/ws/trainer.sock \
//       [--name node-client] [--example "QUESTION=>ANSWER" ...] [--timeout SECONDS]
//
// Set WEIGHTSHARE_TOKEN when the services were started with --token: it is sent on every call as
// `authorization: Bearer <token>` metadata.

import { readFileSync } from "node:fs";
import { dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";

import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";

const PROTOS = resolve(dirname(fileURLToPath(import.meta.url)), "../../protos");
const CONTRACT_VERSION = "weightshare.v1";
const DEFAULT_EXAMPLES = [
  ["what is the color of the sky", "green house"],
  ["what is the color of the sky", "green house"],
];
const CALL_TIMEOUT_MS = 30_000;

// Field names: keepCase false, so fields are lowerCamelCase as in protobuf's JSON mapping (and in
// `buf curl` output): trainer_name is trainerName, read_only is readOnly.
// uint64: `longs: String` gives every 64-bit field as a decimal string (a JS number is exact only up
// to 2^53); compare them as BigInt. Enums arrive as their names; `defaults` fills in unset fields
// (proto3 does not send zero values); `oneofs` adds a virtual field naming the member that is set.
const LOADER_OPTIONS = {
  keepCase: false,
  longs: String,
  enums: String,
  defaults: true,
  oneofs: true,
  includeDirs: [PROTOS],
};
// The Python side's limits (weightshare/grpc_util.py): a big model's layout runs to about 1 MB, more
// than grpc-js's 4 MiB default would allow with room to spare.
const CHANNEL_OPTIONS = {
  "grpc.max_receive_message_length": 64 * 1024 * 1024,
  "grpc.max_send_message_length": 64 * 1024 * 1024,
};

function emit(result, fields) {
  process.stdout.write(JSON.stringify({ result, ...fields }) + "\n");
}

function statusName(code) {
  return Object.keys(grpc.status).find((name) => grpc.status[name] === code) ?? String(code);
}

function parseCommandLine() {
  const { values } = parseArgs({
    options: {
      inference: { type: "string" },
      trainer: { type: "string" },
      name: { type: "string", default: "node-client" },
      example: { type: "string", multiple: true },
      timeout: { type: "string", default: "180" },
    },
  });
  if (!values.inference || !values.trainer) {
    throw new Error("usage: node client.js --inference unix:///path.sock --trainer unix:///path.sock "
      + "[--name NAME] [--example 'QUESTION=>ANSWER' ...] [--timeout SECONDS]");
  }
  const examples = (values.example ?? []).map((text) => {
    const at = text.indexOf("=>");
    if (at < 0) throw new Error(`--example ${JSON.stringify(text)}: write it as 'QUESTION=>ANSWER'`);
    return [text.slice(0, at).trim(), text.slice(at + 2).trim()];
  });
  const timeoutS = Number(values.timeout);
  if (!(timeoutS > 0)) throw new Error(`--timeout ${values.timeout}: must be a positive number of seconds`);
  return { ...values, examples: examples.length ? examples : DEFAULT_EXAMPLES, timeoutS };
}

// Promise wrapper for a unary call, with the bearer token (if any) and a deadline.
function unary(client, method, request, metadata) {
  return new Promise((resolvePromise, reject) => {
    const deadline = new Date(Date.now() + CALL_TIMEOUT_MS);
    client[method](request, metadata, { deadline }, (err, response) => {
      if (err) {
        err.rpc = method;
        reject(err);
      } else {
        resolvePromise(response);
      }
    });
  });
}

function chatExample(question, answer) {
  return { chat: { messages: [{ role: "user", content: question }, { role: "assistant", content: answer }] } };
}

// Linux boot id: the inference side hands out handles (/dev/shm files, CUDA IPC) only to processes on
// its own machine, and compares this id to know. The Python trainer sends the same (weightshare/shm.py).
function hostId() {
  return readFileSync("/proc/sys/kernel/random/boot_id", "utf8").trim();
}

function countHandles(exportClient, sessionId, metadata) {
  return new Promise((resolvePromise, reject) => {
    const counts = { batches: 0, views: 0, storages: 0, totalViews: 0, storageKinds: {}, instanceIds: new Set() };
    const call = exportClient.StreamHandles({ tpRank: 0, batchSize: 0, sessionId }, metadata,
      { deadline: new Date(Date.now() + CALL_TIMEOUT_MS) });
    call.on("data", (batch) => {
      counts.batches += 1;
      counts.views += batch.views.length;
      counts.storages += batch.storages.length;
      counts.totalViews = batch.totalViews;
      counts.instanceIds.add(batch.instanceId);
      // `handle` is the oneof's virtual field: "sharedMemory" (CPU: a /dev/shm file name, which a Node
      // program could mmap) or "cudaIpc" (GPU). This client only counts them; it opens nothing.
      for (const storage of batch.storages) {
        counts.storageKinds[storage.handle] = (counts.storageKinds[storage.handle] ?? 0) + 1;
      }
    });
    call.on("error", (err) => {
      err.rpc = "StreamHandles";
      reject(err);
    });
    call.on("end", () => resolvePromise(counts));
  });
}

async function waitUntilTrained(trainerClient, target, metadata, timeoutS) {
  const deadline = Date.now() + timeoutS * 1000;
  for (;;) {
    const status = await unary(trainerClient, "GetTrainingStatus", {}, metadata);
    if (BigInt(status.trainedExamples) >= target) return status;
    if (status.lastError) throw new Error(`training failed: ${status.lastError}`);
    if (Date.now() > deadline) {
      throw new Error(`examples not trained within ${timeoutS} s: trained ${status.trainedExamples} of `
        + `${target}, pending ${status.pendingExamples}, inference problem ${JSON.stringify(status.inferenceProblem)}`);
    }
    await new Promise((r) => setTimeout(r, 500));
  }
}

async function main() {
  const args = parseCommandLine();
  const definitions = protoLoader.loadSync(
    ["weightshare/v1/weight_export_service.proto", "weightshare/v1/trainer_service.proto"], LOADER_OPTIONS);
  const v1 = grpc.loadPackageDefinition(definitions).weightshare.v1;

  const metadata = new grpc.Metadata();
  if (process.env.WEIGHTSHARE_TOKEN) metadata.set("authorization", `Bearer ${process.env.WEIGHTSHARE_TOKEN}`);

  // Unix sockets are plain text (grpc-js takes `unix:///abs/path` targets); the socket's file mode
  // (0600) keeps other users out, a token keeps out other processes of the same user.
  const credentials = grpc.credentials.createInsecure();
  const exportClient = new v1.WeightExportService(args.inference, credentials, CHANNEL_OPTIONS);
  const trainerClient = new v1.TrainerService(args.trainer, credentials, CHANNEL_OPTIONS);
  let sessionId = null;
  try {
    // --- WeightExportService: what is served ---
    const info = await unary(exportClient, "GetModelInfo", { tpRank: 0 }, metadata);
    if (info.contractVersion !== CONTRACT_VERSION) {
      throw new Error(`server speaks contract ${info.contractVersion}, this client ${CONTRACT_VERSION}`);
    }
    const id = info.identity;
    emit("model_info", {
      contractVersion: info.contractVersion, architecture: id.architecture, model: id.model, dtype: id.dtype,
      deviceKind: id.deviceKind, tpSize: id.tpSize, weightsVersion: id.weightsVersion,
      engineVersion: id.engineVersion, updateMode: info.updateMode, instanceId: id.instanceId,
      sameHost: id.hostId === hostId(),
    });

    // read_only: the inference side lets ONE writer per served model hold the writer lease (a second
    // writer is refused, naming the holder; take_over would end the holder's session). This client only
    // reads the weights, and a trainer is typically attached already as the writer, so it attaches
    // read-only: any number of such sessions may exist, and UpdateWeights answers PERMISSION_DENIED.
    const attached = await unary(exportClient, "AttachTrainer", {
      trainerName: args.name, hostId: hostId(), pid: process.pid, readOnly: true, takeOver: false,
      expectedInstanceId: id.instanceId,
    }, metadata);
    sessionId = attached.sessionId;
    emit("attached", { sessionId, name: args.name, pid: process.pid, readOnly: true });

    // --- The layout: how each HF parameter sits in vLLM's (merged) tensors ---
    const layout = await unary(exportClient, "GetLayout", { tpRank: 0 }, metadata);
    const params = layout.parameters;
    const merged = params.find((p) => p.slices.length === 1 && p.slices[0].engineTensor !== p.hfName);
    const sample = [...new Set([params[0], merged, params[params.length - 1]].filter(Boolean))];
    emit("layout", {
      parameters: params.length, engineTensors: layout.engineTensors.length,
      zeroCopy: params.filter((p) => p.zeroCopy).length,
      sample: sample.map((p) => ({
        hfName: p.hfName, hfShape: p.hfShape.map(Number), hfDtype: p.hfDtype, engineSlices: p.slices.length,
        engineTensor: p.slices[0]?.engineTensor ?? null, zeroCopy: p.zeroCopy,
        ...(p.tiedTo ? { tiedTo: p.tiedTo } : {}),
        ...(p.zeroCopy ? {} : { notZeroCopyReason: p.notZeroCopyReason }),
      })),
    });

    // --- Handles: counted, not opened ---
    const handles = await countHandles(exportClient, sessionId, metadata);
    emit("handles", {
      batches: handles.batches, views: handles.views, totalViews: handles.totalViews, storages: handles.storages,
      storageKinds: handles.storageKinds,
      sameInstance: handles.instanceIds.size === 1 && handles.instanceIds.has(id.instanceId),
    });

    const exportStatus = await unary(exportClient, "GetExportStatus", {}, metadata);
    emit("export_status", {
      weightsVersion: exportStatus.identity.weightsVersion, paused: exportStatus.paused,
      updateInProgress: exportStatus.updateInProgress, commits: exportStatus.commits,
      weightsTorn: exportStatus.weightsTorn,
      trainers: exportStatus.trainers.map((t) => ({ name: t.trainerName, pid: t.pid, readOnly: t.readOnly })),
    });

    // --- TrainerService: submit examples and wait until they are trained ---
    const before = await unary(trainerClient, "GetTrainingStatus", {}, metadata);
    const submitted = await unary(trainerClient, "SubmitExamples",
      { examples: args.examples.map(([q, a]) => chatExample(q, a)) }, metadata);
    emit("submitted", { exampleIds: submitted.exampleIds, pendingExamples: submitted.pendingExamples });
    const target = BigInt(before.trainedExamples) + BigInt(args.examples.length);
    const trained = await waitUntilTrained(trainerClient, target, metadata, args.timeoutS);
    emit("training_status", {
      trainedExamples: trained.trainedExamples, trainedBefore: before.trainedExamples,
      pendingExamples: trained.pendingExamples, step: trained.step, weightsVersion: trained.weightsVersion,
      lastLoss: trained.lastLoss, running: trained.running, inferenceConnected: trained.inferenceConnected,
    });

    // --- Errors: an example whose assistant turn is empty is refused with INVALID_ARGUMENT ---
    try {
      await unary(trainerClient, "SubmitExamples", { examples: [chatExample("what is the color of the sky", "")] },
        metadata);
      throw new Error("SubmitExamples accepted an example with an empty assistant turn");
    } catch (err) {
      if (err.code === undefined) throw err;
      emit("bad_request", { rpc: "SubmitExamples", code: statusName(err.code), details: err.details });
    }
  } catch (err) {
    // Leave no session behind on failure; the first error is the one reported.
    if (sessionId !== null) await unary(exportClient, "DetachTrainer", { sessionId }, metadata).catch(() => {});
    sessionId = null;
    throw err;
  } finally {
    if (sessionId !== null) {
      const detached = await unary(exportClient, "DetachTrainer", { sessionId }, metadata);
      emit("detached", { sessionId, remainingTrainers: detached.remainingTrainers });
    }
    exportClient.close();
    trainerClient.close();
  }
}

main().then(
  () => process.exit(0),
  (err) => {
    const where = err.rpc ? `${err.rpc}: ${statusName(err.code)}: ${err.details}` : err.message;
    process.stderr.write(`weightshare node client: ${where.replace(/\s+/g, " ")}\n`);
    process.exit(1);
  },
);
