-- wrk script: POST /increment, each request a random one of 1,000 keys and a value 1 to 5.
-- With KEYED=1 in the environment every request also carries a fresh Idempotency-Key.
local keyed = os.getenv("KEYED") == "1"
local threads = 0

function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end

local keys = {}
local counter = 0

function init(args)
  -- The same 1,000 keys in every thread; then each thread its own sequence.
  math.randomseed(1000)
  for i = 1, 1000 do
    keys[i] = string.format("%08x-%04x-4%03x-%04x-%04x%08x",
      math.random(0, 0x7fffffff), math.random(0, 0xffff), math.random(0, 0xfff),
      0x8000 + math.random(0, 0x3fff), math.random(0, 0xffff), math.random(0, 0x7fffffff))
  end
  math.randomseed(os.time() * 1000 + (tid or 0))
end

function request()
  local body = '{"key":"' .. keys[math.random(1, 1000)] .. '","value":' .. math.random(1, 5) .. '}'
  local headers = { ["Content-Type"] = "application/json" }
  if keyed then
    counter = counter + 1
    headers["Idempotency-Key"] = string.format("wrk-%d-%d-%d", os.time(), tid or 0, counter)
  end
  return wrk.format("POST", "/increment", headers, body)
end
