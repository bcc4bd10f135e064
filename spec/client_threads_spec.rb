# frozen_string_literal: true

require "spec_helper"

# Every wait releases the GVL: other Ruby threads run during a call, and many threads
# share one client with their calls in flight at the same time.
RSpec.describe "Flowctl clients: threads" do
  Official.load!
  cp = Obsrvr::Flow::Controlplane

  before(:all) do
    @gate = {mutex: Mutex.new, cond: ConditionVariable.new, arrived: 0}
    gate = @gate
    wait_s = time_limit(5) # under valgrind the eight calls take longer to arrive
    handler = OfficialServer::Handler.new(
      register_processor: ->(req, _call) { cp::RegisterProcessorResponse.new(processor_id: req.processor_id, success: true) },
      processor_heartbeat: ->(req, _call) { sleep Float(req.status); cp::ProcessorHeartbeatResponse.new(success: true) },
      # answers only once `want` calls are in the server at the same time
      register_consumer: lambda { |req, _call|
        want = Integer(req.endpoint)
        all_in = gate[:mutex].synchronize do
          gate[:arrived] += 1
          gate[:cond].broadcast
          limit = Time.now + wait_s
          gate[:cond].wait(gate[:mutex], 0.05) while gate[:arrived] < want && Time.now < limit
          gate[:arrived] >= want
        end
        cp::RegisterConsumerResponse.new(consumer_id: req.consumer_id, success: all_in)
      }
    )
    @server = OfficialServer.new(pool_size: 64) # the official server refuses calls when no worker is idle
    @port = @server.start(handler_for_controlplane: handler, tls: false)
  end

  after(:all) { @server&.stop }

  let(:client) { Flowctl::ControlPlane::Client.new("127.0.0.1:#{@port}", tls: false, timeout: time_limit(5)) }

  after { client.close }

  it "8 threads x 100 calls share one client, each getting its own replies" do
    results = Array.new(8) do |t|
      Thread.new { Array.new(100) { |i| client.register_processor(processor_id: "t#{t}-#{i}").processor_id } }
    end.map(&:value)
    results.each_with_index { |ids, t| expect(ids).to eq(Array.new(100) { |i| "t#{t}-#{i}" }) }
  end

  it "keeps 8 calls of 8 threads in flight at the same time" do
    @gate[:arrived] = 0
    replies = Array.new(8) { |i| Thread.new { client.register_consumer(consumer_id: "c#{i}", endpoint: "8") } }.map(&:value)
    expect(replies.map(&:success)).to all(be(true))
    expect(replies.map(&:consumer_id)).to match_array(Array.new(8) { |i| "c#{i}" })
  end

  it "lets another Ruby thread run at full speed during a blocked call" do
    count = lambda do |secs|
      n = 0
      stop = Process.clock_gettime(Process::CLOCK_MONOTONIC) + secs
      n += 1 while Process.clock_gettime(Process::CLOCK_MONOTONIC) < stop
      n
    end
    idle = count.call(0.3)
    during = nil
    counter = Thread.new { sleep 0.05; during = count.call(0.3) }
    expect(client.processor_heartbeat(status: "0.5").success).to be(true)
    counter.join
    # the counter had the GVL to itself (the machine is shared, so allow for noise)
    expect(during).to be > idle * 0.5
  end
end
